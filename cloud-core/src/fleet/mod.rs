//! The fleet: the CA that gives devices their identities (and takes them back).

pub mod ca;
