//! Nothing a remote writes can panic the reader: random bytes, and fixtures with random damage, under every key
//! kind must come back as `Ok` or a `Rejected`, never a panic.

use causeway_store::validate::validate_cluster_config;
use causeway_store::{ClusterId, ClusterName, MaxConnectedClusters, RemoteContext};
use proptest::prelude::*;

fn east7() -> RemoteContext {
    let mode = MaxConnectedClusters::C255;
    RemoteContext { name: ClusterName::new("east").unwrap(), id: ClusterId::new(7, mode).unwrap(), mode }
}

const KEYS: [&str; 8] = [
    "cilium/state/services/v1/east/shop/cart",
    "cilium/state/nodes/v1/east/east-node-2",
    "cilium/state/ip/v1/default/10.1.2.33",
    "cilium/state/ip/v1/default/fd00:10:1:2::21",
    "cilium/state/identities/v1/id/458771",
    "cilium/state/serviceexports/v1/east/shop/cart",
    "cilium/synced/east/cilium/state/ip/v1",
    "cilium/cluster-config/east",
];

const FIXTURES: [&str; 6] = [
    "service-hostnames-zones.json",
    "node.json",
    "node-dualstack.json",
    "ipcache.json",
    "identity.txt",
    "cluster-config.json",
];

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/golden/{name}", env!("CARGO_MANIFEST_DIR"))).expect("fixture")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(key in prop::sample::select(&KEYS[..]), value in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = east7().decode(key, &value);
    }

    #[test]
    fn random_keys_never_panic(key in "(cilium/)?(state/)?[a-z./:0-9-]{0,60}", value in prop::collection::vec(any::<u8>(), 0..64)) {
        let _ = east7().decode(&key, &value);
    }

    #[test]
    fn damaged_fixtures_never_panic(
        key in prop::sample::select(&KEYS[..]),
        name in prop::sample::select(&FIXTURES[..]),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut value = fixture(name);
        for (at, byte) in edits {
            let i = at.index(value.len());
            value[i] = byte;
        }
        value.truncate(cut.index(value.len() + 1));
        let _ = east7().decode(key, &value);
        let local = ClusterId::new(1, MaxConnectedClusters::C255).unwrap();
        let _ = validate_cluster_config(&east7().name, &value, local, MaxConnectedClusters::C255, []);
    }
}
