//! The verdict prompt: how a hard case is put to the model.
