//! placeholder
// x
