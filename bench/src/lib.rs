//! Benchmarks of Causeway's data paths against raw etcd, each measured in the same run as its baseline.
//!
//! The binaries in `src/bin/` (`cold-import`, `export`, `memory`, `propagation`) start their own etcd processes
//! through `causeway-testsupport`, print every figure next to its baseline and the ratio, and exit non-zero on a
//! missed target only with `--enforce` (CI runs them without it: timing on shared machines is not a test). The
//! figures and how to reproduce them are in `docs/benchmarks.md`.
//!
//! This library holds what the binaries share: the synthetic cluster ([`data`]), raw etcd-client helpers for the
//! baselines ([`raw`]), the reader pipeline the way identity-sync wires it ([`import`]), and reporting ([`report`]).

pub mod data;
pub mod import;
pub mod raw;
pub mod report;
