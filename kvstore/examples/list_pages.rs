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

    let mut kv = client.kv_client().max_decoding_message_size(64 * 1024 * 1024);
    for _ in 0..2 {
        let t = Instant::now();
        match kv.get(prefix, Some(GetOptions::new().with_prefix())).await {
            Ok(r) => println!("baseline: raw single get        {:>6} keys in {:?}", r.kvs().len(), t.elapsed()),
            Err(e) => println!("baseline: raw single get        failed after {:?}: {e}", t.elapsed()),
        }
    }

    // Raw key-paginated reads at a pinned revision, plain and with the get options that
    // might lighten a page (keys_only, serializable).
    let end = format!("{}0", prefix.trim_end_matches('/'));
    for page in pages() {
        for (name, keys_only, serializable) in
            [("plain", false, false), ("keys_only", true, false), ("serializable", false, true)]
        {
            let t = Instant::now();
            let (mut start, mut rev, mut n) = (prefix.as_bytes().to_vec(), 0, 0);
            loop {
                let mut o = GetOptions::new().with_range(end.clone()).with_limit(page);
                if rev > 0 {
                    o = o.with_revision(rev);
                }
                if keys_only {
                    o = o.with_keys_only();
                }
                if serializable {
                    o = o.with_serializable();
                }
                let r = kv.get(start.clone(), Some(o)).await?;
                if rev == 0 {
                    rev = r.header().map(|h| h.revision()).unwrap_or(0);
                }
                n += r.kvs().len();
                match r.kvs().last() {
                    Some(last) if r.more() => {
                        start = last.key().to_vec();
                        start.push(0);
                    }
                    _ => break,
                }
            }
            println!("raw paged {name:>12}, page {page:>6}: {n:>6} keys in {:?}", t.elapsed());
        }
    }

    for page in pages() {
        let mut cfg = WatchStoreConfig::new(prefix);
        cfg.list_page_size = page;
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
        println!("WatchStore list, page {page:>6}: {n:>6} keys in {:?}", t.elapsed());
    }
    Ok(())
}

/// Page sizes to try: `PAGES=1000,10000` or a default sweep.
fn pages() -> Vec<i64> {
    std::env::var("PAGES")
        .ok()
        .map(|s| s.split(',').filter_map(|p| p.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1000, 2000, 5000, 10000, 20000])
}
