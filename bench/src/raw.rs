//! Raw etcd-client operations: the baselines, and bulk loading of a store before a read bench.

use std::time::Duration;

use anyhow::Context;
use etcd_client::{Client, GetOptions, KvClient, PutOptions, Txn, TxnOp};
use futures::{StreamExt, TryStreamExt};

/// Puts `kvs` in txns of `batch` puts with `in_flight` txns outstanding at once, each key attached to one of
/// `leases` (round robin by txn; none when empty). Returns when every txn is acknowledged.
pub async fn bulk_put(
    client: &Client,
    kvs: &[(String, Vec<u8>)],
    batch: usize,
    in_flight: usize,
    leases: &[i64],
) -> anyhow::Result<()> {
    let kv = client.kv_client();
    futures::stream::iter(kvs.chunks(batch.max(1)).enumerate())
        .map(|(n, chunk)| {
            let mut kv = kv.clone();
            let opts = (!leases.is_empty()).then(|| PutOptions::new().with_lease(leases[n % leases.len()]));
            let ops: Vec<TxnOp> = chunk.iter().map(|(k, v)| TxnOp::put(k.as_str(), v.clone(), opts.clone())).collect();
            async move { kv.txn(Txn::new().and_then(ops)).await.context("raw txn") }
        })
        .buffer_unordered(in_flight.max(1))
        .try_for_each(|_| async { Ok(()) })
        .await
}

/// Grants `n` leases of `ttl`.
pub async fn grant_leases(client: &Client, n: usize, ttl: Duration) -> anyhow::Result<Vec<i64>> {
    let mut lc = client.lease_client();
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        ids.push(lc.grant(ttl.as_secs() as i64, None).await.context("grant lease")?.id());
    }
    Ok(ids)
}

/// The exclusive end of the range of keys starting with `prefix`.
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// What a range read returned.
#[derive(Debug, Default, Clone, Copy)]
pub struct Read {
    pub keys: usize,
    pub key_bytes: usize,
    pub value_bytes: usize,
}

impl std::ops::AddAssign for Read {
    fn add_assign(&mut self, o: Read) {
        self.keys += o.keys;
        self.key_bytes += o.key_bytes;
        self.value_bytes += o.value_bytes;
    }
}

/// Reads every key under `prefix` in pages of `page` keys, every page at the first page's revision: the same
/// requests the WatchStore's listing makes.
pub async fn range_paginated(kv: &mut KvClient, prefix: &str, page: i64) -> anyhow::Result<Read> {
    let end = prefix_end(prefix);
    let mut start = prefix.as_bytes().to_vec();
    let mut revision = 0;
    let mut read = Read::default();
    loop {
        let mut opts = GetOptions::new().with_range(end.clone()).with_limit(page);
        if revision > 0 {
            opts = opts.with_revision(revision);
        }
        let resp = kv.get(start.clone(), Some(opts)).await.context("paginated range read")?;
        if revision == 0 {
            revision = resp.header().map(|h| h.revision()).unwrap_or_default();
        }
        for kv in resp.kvs() {
            read.keys += 1;
            read.key_bytes += kv.key().len();
            read.value_bytes += kv.value().len();
        }
        match resp.kvs().last() {
            Some(last) if resp.more() => {
                start = last.key().to_vec();
                start.push(0);
            }
            _ => return Ok(read),
        }
    }
}

/// Reads every key under `prefix` in one request (the client must accept a large response).
pub async fn range_oneshot(kv: &mut KvClient, prefix: &str) -> anyhow::Result<Read> {
    let resp =
        kv.get(prefix, Some(GetOptions::new().with_range(prefix_end(prefix)))).await.context("one-shot range read")?;
    let mut read = Read::default();
    for kv in resp.kvs() {
        read.keys += 1;
        read.key_bytes += kv.key().len();
        read.value_bytes += kv.value().len();
    }
    Ok(read)
}

/// Reads each prefix concurrently (one request stream per prefix, like one WatchStore per prefix).
pub async fn read_prefixes(client: &Client, prefixes: &[String], page: Option<i64>) -> anyhow::Result<Read> {
    let reads = futures::future::try_join_all(prefixes.iter().map(|p| {
        let mut kv = client.kv_client().max_decoding_message_size(1 << 30);
        async move {
            match page {
                Some(page) => range_paginated(&mut kv, p, page).await,
                None => range_oneshot(&mut kv, p).await,
            }
        }
    }))
    .await?;
    let mut total = Read::default();
    for r in reads {
        total += r;
    }
    Ok(total)
}
