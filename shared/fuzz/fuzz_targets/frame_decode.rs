//! The frame decoder on arbitrary bytes: never panics, never allocates the claimed size,
//! and whatever it decodes re-encodes to the same frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::frame::{Decoded, FrameCodec};

fuzz_target!(|data: &[u8]| {
    let codec = FrameCodec::new(64 * 1024);
    let mut rest = data;
    while let Ok(Decoded::Frame(msg, used)) = codec.decode(rest) {
        let mut again = Vec::new();
        codec
            .encode(&msg, &mut again)
            .expect("a decoded frame re-encodes");
        match codec.decode(&again) {
            Ok(Decoded::Frame(back, n)) => {
                // Compare encodings, not values: a float payload may be NaN.
                let mut third = Vec::new();
                codec.encode(&back, &mut third).expect("re-encodes");
                assert_eq!(third, again);
                assert_eq!(n, again.len());
            }
            other => panic!("re-encoded frame did not decode: {other:?}"),
        }
        rest = &rest[used..];
    }
});
