//! One module per verb, each a thin layer over the library that owns the work.

pub mod boot;
