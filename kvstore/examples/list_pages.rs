//! Measures listing 100k keys through `WatchStore` at several page sizes, beside a raw
//! single-request get of the whole prefix (the baseline), on a real etcd.
//!
//! `cargo run --release -p causeway-kvstore --example list_pages [keys]`

use std::time::{Duration, Instant};

use causeway_kvstore::{connect, EtcdConfig, WatchEvent, WatchStore, WatchStoreConfig};
use causeway_testsupport::Etcd;
use etcd_client::{GetOptions, Txn, TxnOp};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let keys: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(100_000);
    let etcd = Etcd::start().await;
    let mut client = connect(&EtcdConfig::new(etcd.endpoints())).await?;
    let prefix = "cilium/state/ip/v1/default/";
    // ~180-byte values, the size of a typical ipcache entry.
    let value = format!(
        "{{\"IP\":\"10.1.2.33\",\"HostIP\":\"192.168.10.12\",\"ID\":458771,\"Key\":0,\
         \"Metadata\":\"\",\"K8sNamespace\":\"shop\",\"K8sPodName\":\"cart-7f9c-x2\",{}}}",
        "\"NamedPorts\":[{\"Name\":\"http\",\"Port\":8080,\"Protocol\":\"TCP\"}]"
    );
    let load = Instant::now();
    for start in (0..keys).step_by(128) {
        let ops: Vec<_> = (start..(start + 128).min(keys))
            .map(|i| TxnOp::put(format!("{prefix}10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255), value.clone(), None))
            .collect();
        client.txn(Txn::new().and_then(ops)).await?;
    }
    println!("loaded {keys} keys ({} B values) in {:?}", value.len(), load.elapsed());

    let t = Instant::now();
    let raw = client.get(prefix, Some(GetOptions::new().with_prefix())).await;
    match raw {
        Ok(r) => println!("baseline: raw single get        {:>6} keys in {:?}", r.kvs().len(), t.elapsed()),
        Err(e) => println!("baseline: raw single get        failed after {:?}: {e}", t.elapsed()),
    }

    for page in [100, 1000, 5000] {
        let mut cfg = WatchStoreConfig::new(prefix);
        cfg.list_page_size = page;
        cfg.channel_capacity = 100_000;
        let t = Instant::now();
        let mut w = WatchStore::start(client.clone(), cfg);
        let mut n = 0;
        loop {
            match tokio::time::timeout(Duration::from_secs(120), w.next()).await? {
                Some(WatchEvent::Upsert { .. }) => n += 1,
                Some(WatchEvent::ListDone) => break,
                other => anyhow::bail!("unexpected {other:?}"),
            }
        }
        println!("WatchStore list, page {page:>5}: {n:>6} keys in {:?}", t.elapsed());
    }
    Ok(())
}
