//! Paginated listing of a prefix at one consistent revision, page by page.

use etcd_client::{GetOptions, KeyValue, KvClient};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::KvError;

/// Keys per page.
///
/// Measured with `examples/list_pages.rs` (100k ipcache-sized keys, 187 B values, local
/// etcd 3.4, 2 cores): one unpaged get fails (24 MB response > gRPC's 4 MiB default
/// limit); pages of 100 take 17.5 s, 1000 take 2.6 s, 5000 take 1.3 s. 2000 keeps pages
/// of typical values around 0.5 MB and under [`MAX_LIST_MESSAGE`] even for 8 KiB values.
pub const DEFAULT_PAGE_SIZE: i64 = 2000;

/// Largest list response accepted (gRPC's default is 4 MiB).
pub const MAX_LIST_MESSAGE: usize = 16 * 1024 * 1024;

/// The exclusive end of the range covering every key that starts with `prefix`.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Empty or all-0xff prefix: the whole keyspace.
    vec![0]
}

/// Reads every key under a prefix, `page_size` keys per request. All pages are read at
/// the revision of the first one, so together they are one consistent snapshot; if that
/// revision is compacted mid-way the next page fails with a compaction error.
pub(crate) struct Pager {
    prefix: String,
    start: Vec<u8>,
    end: Vec<u8>,
    page_size: i64,
    /// The revision the whole listing reflects (known after the first page).
    pub(crate) revision: i64,
    /// etcd cluster id: a new one means an etcd without our history.
    pub(crate) cluster_id: u64,
    done: bool,
}

impl Pager {
    pub(crate) fn new(prefix: &str, page_size: i64) -> Self {
        Self {
            prefix: prefix.to_owned(),
            start: prefix.as_bytes().to_vec(),
            end: prefix_end(prefix.as_bytes()),
            page_size: page_size.max(1),
            revision: 0,
            cluster_id: 0,
            done: false,
        }
    }

    /// The next page, `None` once the listing is complete.
    pub(crate) async fn next_page(&mut self, kv: &mut KvClient) -> Result<Option<Vec<KeyValue>>, KvError> {
        if self.done {
            return Ok(None);
        }
        let mut opts = GetOptions::new().with_range(self.end.clone()).with_limit(self.page_size);
        if self.revision > 0 {
            opts = opts.with_revision(self.revision);
        }
        let mut resp =
            kv.get(self.start.clone(), Some(opts)).await.map_err(|e| KvError::request("list", &*self.prefix, e))?;
        if self.revision == 0 {
            if let Some(h) = resp.header() {
                self.revision = h.revision();
                self.cluster_id = h.cluster_id();
            }
        }
        let more = resp.more();
        let page = resp.take_kvs();
        match page.last() {
            Some(last) if more => {
                // Next page starts right after the last key of this one.
                self.start = last.key().to_vec();
                self.start.push(0);
            }
            _ => self.done = true,
        }
        Ok(Some(page))
    }
}

/// One page of a [`prefetch`]ed listing.
pub(crate) struct Page {
    pub(crate) kvs: Vec<KeyValue>,
    /// The revision of the whole listing.
    pub(crate) revision: i64,
    /// See [`Pager::cluster_id`].
    pub(crate) cluster_id: u64,
    /// The listing is complete with this page. A channel that closes before such a page
    /// means the lister died: the listing is incomplete.
    pub(crate) last: bool,
}

/// Aborts the task when dropped, so a lister never outlives its consumer.
pub(crate) struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Lists `prefix` in a task that fetches the next page while the caller handles the
/// current one (one page ahead at most, so memory stays at ~2 pages). The task ends after
/// sending the last page (`last`) or the first error.
pub(crate) fn prefetch(
    mut kv: KvClient,
    prefix: &str,
    page_size: i64,
) -> (mpsc::Receiver<Result<Page, KvError>>, AbortOnDrop) {
    let (tx, rx) = mpsc::channel(1);
    let mut pager = Pager::new(prefix, page_size);
    let task = tokio::spawn(async move {
        loop {
            let item = match pager.next_page(&mut kv).await {
                Ok(Some(kvs)) => {
                    Ok(Page { kvs, revision: pager.revision, cluster_id: pager.cluster_id, last: pager.done })
                }
                Ok(None) => return,
                Err(e) => Err(e),
            };
            let stop = !matches!(item, Ok(Page { last: false, .. }));
            if tx.send(item).await.is_err() || stop {
                return;
            }
        }
    });
    (rx, AbortOnDrop(task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_last_byte() {
        assert_eq!(prefix_end(b"cilium/state/"), b"cilium/state0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b""), vec![0]);
    }
}
