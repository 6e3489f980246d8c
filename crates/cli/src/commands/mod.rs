//! One module per verb, each a thin layer over the library that owns the work.

pub mod bench;
pub mod boot;
pub mod fork;
pub mod images;
pub mod inspect;
pub mod logs;
pub mod pause;
pub mod ps;
pub mod resume;
pub mod rm;
pub mod run;
pub mod stop;
pub mod template;
pub mod vm;
