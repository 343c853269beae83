//! The verdict prompt: how a hard case is put to the model.

// (Temporary scaffold so the service compiles; the real prompt design replaces this whole file.)
/// The prompt text for a case.
pub fn render(case: &shared::case::HardCase) -> String {
    format!("machine {} case {}\nverdict:", case.machine, case.id)
}
