//! The record parser on arbitrary bytes: never panics, and an accepted record survives a
//! round trip through its JSON form unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::record::Record;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Record::from_json_slice(data) {
        let back = Record::from_json_value(r.to_json()).expect("an accepted record re-parses");
        assert_eq!(back.machine, r.machine);
        assert_eq!(back.ts_ms, r.ts_ms);
        assert_eq!(back.readings, r.readings);
        assert_eq!(back.message, r.message);
        assert_eq!(back.id, r.id);
    }
});
