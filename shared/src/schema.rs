//! The definitions every component agrees on: classes, readings, window, limits.
//!
//! Changing anything here changes the student model's input or output layout: retrain
//! and re-export the model in `onnx/` (the agent refuses a model whose metadata disagrees).

/// The fault classes, in the order of the student model's output.
pub const CLASSES: [&str; 6] = [
    "normal",
    "bearing_wear",
    "overheating",
    "misalignment",
    "electrical_fault",
    "sensor_fault",
];

/// Number of classes.
pub const NUM_CLASSES: usize = CLASSES.len();

/// Readings every record must carry, in channel order.
pub const CHANNELS: [&str; 4] = ["vibration", "temperature", "current", "pressure"];

/// Number of consecutive records of one machine that make one window (one case).
pub const WINDOW_LEN: usize = 16;

/// Longest machine name.
pub const MACHINE_MAX_LEN: usize = 64;
/// Longest log line kept in `message`.
pub const MESSAGE_MAX_LEN: usize = 2048;
/// Longest idempotency key.
pub const ID_MAX_LEN: usize = 128;
/// Most named readings in one record (the four required ones included).
pub const MAX_READINGS: usize = 64;
/// Longest reading name.
pub const READING_NAME_MAX_LEN: usize = 64;

/// Index of a class name, if it is one of [`CLASSES`].
pub fn class_index(name: &str) -> Option<usize> {
    CLASSES.iter().position(|c| *c == name)
}

/// `true` if `name` is a valid machine name: 1–64 characters of `A-Za-z0-9._-`.
pub fn valid_machine(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MACHINE_MAX_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}
