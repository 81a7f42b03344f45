//! Cluster names, cluster IDs and the identity range each cluster may allocate from.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ClusterError {
    #[error("cluster name {name:?} is invalid: {why} (use at most 32 lowercase letters, digits and '-', starting and ending with a letter or digit)")]
    InvalidName { name: String, why: &'static str },
    #[error("cluster name \"default\" is not allowed for a meshed cluster: give each cluster a unique name")]
    DefaultName,
    #[error("cluster ID {id} is out of range: must be 1..={max} when maxConnectedClusters is {mode}")]
    IdOutOfRange { id: u32, max: u32, mode: u32 },
    #[error("maxConnectedClusters {0} is not supported: use 255 or 511")]
    UnsupportedMode(u32),
}

/// A validated cluster name: at most 32 characters, `^([a-z0-9][-a-z0-9]*)?[a-z0-9]$`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClusterName(String);

impl ClusterName {
    pub const MAX_LEN: usize = 32;

    pub fn new(name: impl Into<String>) -> Result<Self, ClusterError> {
        let name = name.into();
        let bad = |why| Err(ClusterError::InvalidName { name: name.clone(), why });
        if name.is_empty() {
            return bad("it is empty");
        }
        if name.len() > Self::MAX_LEN {
            return bad("it is longer than 32 characters");
        }
        if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
            return bad("it has characters other than a-z, 0-9 and '-'");
        }
        if name.starts_with('-') || name.ends_with('-') {
            return bad("it starts or ends with '-'");
        }
        Ok(ClusterName(name))
    }

    /// Like [`ClusterName::new`], and also refuses `default`, which `clustermesh connect` rejects because two
    /// clusters left at the default would collide.
    pub fn new_meshed(name: impl Into<String>) -> Result<Self, ClusterError> {
        let n = Self::new(name)?;
        if n.0 == "default" {
            return Err(ClusterError::DefaultName);
        }
        Ok(n)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for ClusterName {
    type Error = ClusterError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        ClusterName::new(s)
    }
}

impl From<ClusterName> for String {
    fn from(n: ClusterName) -> String {
        n.0
    }
}

impl FromStr for ClusterName {
    type Err = ClusterError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ClusterName::new(s)
    }
}

/// `maxConnectedClusters`: how many clusters a mesh may hold, which fixes how the 24-bit identity space is split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(try_from = "u32", into = "u32")]
pub enum MaxConnectedClusters {
    #[default]
    C255,
    C511,
}

impl MaxConnectedClusters {
    pub fn get(self) -> u32 {
        match self {
            MaxConnectedClusters::C255 => 255,
            MaxConnectedClusters::C511 => 511,
        }
    }

    /// `24 - log2(max + 1)`: 16 for 255 clusters, 15 for 511.
    pub fn shift(self) -> u32 {
        match self {
            MaxConnectedClusters::C255 => 16,
            MaxConnectedClusters::C511 => 15,
        }
    }
}

impl TryFrom<u32> for MaxConnectedClusters {
    type Error = ClusterError;
    fn try_from(v: u32) -> Result<Self, ClusterError> {
        match v {
            255 => Ok(MaxConnectedClusters::C255),
            511 => Ok(MaxConnectedClusters::C511),
            other => Err(ClusterError::UnsupportedMode(other)),
        }
    }
}

impl From<MaxConnectedClusters> for u32 {
    fn from(m: MaxConnectedClusters) -> u32 {
        m.get()
    }
}

/// A cluster ID, valid for its mode: `1..=255` or `1..=511`. ID 0 is reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(into = "u32")]
pub struct ClusterId(u32);

impl ClusterId {
    pub fn new(id: u32, mode: MaxConnectedClusters) -> Result<Self, ClusterError> {
        if id == 0 || id > mode.get() {
            return Err(ClusterError::IdOutOfRange { id, max: mode.get(), mode: mode.get() });
        }
        Ok(ClusterId(id))
    }

    pub fn get(self) -> u32 {
        self.0
    }

    /// The identities this cluster may allocate: `[id << shift, ((id + 1) << shift) - 1]`.
    pub fn identity_range(self, mode: MaxConnectedClusters) -> IdentityRange {
        let shift = mode.shift();
        IdentityRange { first: self.0 << shift, last: ((self.0 + 1) << shift) - 1 }
    }
}

impl From<ClusterId> for u32 {
    fn from(c: ClusterId) -> u32 {
        c.0
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// An inclusive range of numeric security identities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdentityRange {
    pub first: u32,
    pub last: u32,
}

impl IdentityRange {
    pub fn contains(&self, id: u32) -> bool {
        (self.first..=self.last).contains(&id)
    }

    /// First identity handed out to workloads. The range's first value (`id << shift`, whose low bits are all
    /// zero) is never allocated, so that "cluster part only" never names a workload; this gives 65,535 usable
    /// identities per cluster in 255 mode and 32,767 in 511 mode.
    pub fn first_allocatable(&self) -> u32 {
        self.first + 1
    }

    pub fn allocatable(&self) -> u32 {
        self.last - self.first
    }
}

/// Everything that names a cluster in the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClusterInfo {
    pub name: ClusterName,
    pub id: ClusterId,
    pub mode: MaxConnectedClusters,
}

impl ClusterInfo {
    pub fn new(name: &str, id: u32, mode: MaxConnectedClusters) -> Result<Self, ClusterError> {
        Ok(ClusterInfo { name: ClusterName::new(name)?, id: ClusterId::new(id, mode)?, mode })
    }

    pub fn identity_range(&self) -> IdentityRange {
        self.id.identity_range(self.mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "east", "east-1", "0", "a-b-c", &"x".repeat(32)] {
            assert!(ClusterName::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-east", "east-", "East", "ea_st", "e.st", &"x".repeat(33)] {
            assert!(ClusterName::new(bad).is_err(), "{bad}");
        }
        assert_eq!(ClusterName::new_meshed("default"), Err(ClusterError::DefaultName));
        assert!(ClusterName::new("default").is_ok());
    }

    #[test]
    fn ids_and_ranges_255() {
        let m = MaxConnectedClusters::C255;
        assert!(ClusterId::new(0, m).is_err());
        assert!(ClusterId::new(256, m).is_err());
        let r = ClusterId::new(1, m).unwrap().identity_range(m);
        assert_eq!((r.first, r.last), (65536, 131071));
        assert_eq!(r.allocatable(), 65535);
        let r = ClusterId::new(255, m).unwrap().identity_range(m);
        assert_eq!(r.last, (1 << 24) - 1);
    }

    #[test]
    fn ids_and_ranges_511() {
        let m = MaxConnectedClusters::C511;
        assert!(ClusterId::new(511, m).is_ok());
        assert!(ClusterId::new(512, m).is_err());
        let r = ClusterId::new(7, m).unwrap().identity_range(m);
        assert_eq!((r.first, r.last), (7 << 15, (8 << 15) - 1));
        assert_eq!(r.allocatable(), 32767);
        let r = ClusterId::new(511, m).unwrap().identity_range(m);
        assert_eq!(r.last, (1 << 24) - 1);
    }

    #[test]
    fn mode_serde() {
        assert_eq!(serde_json::to_string(&MaxConnectedClusters::C511).unwrap(), "511");
        assert!(serde_json::from_str::<MaxConnectedClusters>("256").is_err());
    }
}
