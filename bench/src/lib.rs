//! Nothing here: the benchmarks live in `benches/` and the fio harness in `bench/*.sh`.
