//! The shadow journal: what the BPF maps cannot hold, kept beside them so a restarted agent reads back exactly what
//! it programmed.
//!
//! Some domain values are wider than their map encoding: an ipcache entry's encryption key and IPv6 tunnel endpoint,
//! an egress group's per-gateway egress IPs (the map keeps only the one this node SNATs to), a route's next node (the
//! kernel route only says "dev <wireguard>"). The kernel stays the source of truth for *presence* and for everything
//! it does store: [`super::KernelDatapath::read_programmed`] uses a shadow value only when its projection equals what
//! the map holds now, and otherwise falls back to what can be decoded from the map alone.
//!
//! The journal is append-only (one line per op, so applying N ops costs N small writes, not N rewrites) and is
//! compacted when it is loaded. Lines that do not parse are skipped: a torn last line after a crash loses only that
//! entry's shadow, never the datapath.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;

use crate::agent::model::{EgressGroup, Gateway, GroupId, IpcacheValue, Route};

/// The shadowed part of the programmed state.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Shadow {
    pub ipcache: BTreeMap<IpNet, IpcacheValue>,
    pub groups: BTreeMap<GroupId, EgressGroup>,
    pub routes: BTreeMap<IpNet, Route>,
}

/// One journal record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Ipcache(IpNet, Option<IpcacheValue>),
    Group(GroupId, Option<EgressGroup>),
    Route(IpNet, Option<Route>),
}

impl Shadow {
    pub fn apply(&mut self, r: &Record) {
        match r {
            Record::Ipcache(k, Some(v)) => {
                self.ipcache.insert(*k, *v);
            }
            Record::Ipcache(k, None) => {
                self.ipcache.remove(k);
            }
            Record::Group(k, Some(v)) => {
                self.groups.insert(*k, v.clone());
            }
            Record::Group(k, None) => {
                self.groups.remove(k);
            }
            Record::Route(k, Some(v)) => {
                self.routes.insert(*k, *v);
            }
            Record::Route(k, None) => {
                self.routes.remove(k);
            }
        }
    }

    fn records(&self) -> impl Iterator<Item = Record> + '_ {
        let a = self.ipcache.iter().map(|(k, v)| Record::Ipcache(*k, Some(*v)));
        let b = self.groups.iter().map(|(k, v)| Record::Group(*k, Some(v.clone())));
        let c = self.routes.iter().map(|(k, v)| Record::Route(*k, Some(*v)));
        a.chain(b).chain(c)
    }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|x| x.to_string()).unwrap_or_else(|| "-".into())
}

fn parse_opt<T: std::str::FromStr>(s: &str) -> Option<Option<T>> {
    if s == "-" {
        Some(None)
    } else {
        s.parse().ok().map(Some)
    }
}

/// One line, space separated: `ipcache <net> <identity> <cluster> <endpoint|-> <key>`, `ipcache- <net>`,
/// `group <id> <node>,<v4|->,<v6|-> ...`, `group- <id>`, `route <net> <via>`, `route- <net>`.
pub fn encode(r: &Record) -> String {
    match r {
        Record::Ipcache(k, Some(v)) => {
            format!("ipcache {k} {} {} {} {}", v.identity, v.cluster_id, opt(v.tunnel_endpoint), v.encrypt_key)
        }
        Record::Ipcache(k, None) => format!("ipcache- {k}"),
        Record::Group(id, Some(g)) => {
            let mut s = format!("group {}", id.0);
            for gw in &g.gateways {
                s.push_str(&format!(" {},{},{}", gw.node_ip, opt(gw.egress_v4), opt(gw.egress_v6)));
            }
            s
        }
        Record::Group(id, None) => format!("group- {}", id.0),
        Record::Route(k, Some(v)) => format!("route {k} {}", v.via_node),
        Record::Route(k, None) => format!("route- {k}"),
    }
}

pub fn decode(line: &str) -> Option<Record> {
    let mut f = line.split_whitespace();
    let kind = f.next()?;
    let rec = match kind {
        "ipcache" => {
            let net: IpNet = f.next()?.parse().ok()?;
            let identity = f.next()?.parse().ok()?;
            let cluster_id = f.next()?.parse().ok()?;
            let tunnel_endpoint = parse_opt::<IpAddr>(f.next()?)?;
            let encrypt_key = f.next()?.parse().ok()?;
            Record::Ipcache(net, Some(IpcacheValue { identity, cluster_id, tunnel_endpoint, encrypt_key }))
        }
        "ipcache-" => Record::Ipcache(f.next()?.parse().ok()?, None),
        "group" => {
            let id = GroupId(f.next()?.parse().ok()?);
            let mut gateways = Vec::new();
            for g in f.by_ref() {
                let mut p = g.split(',');
                let node_ip = p.next()?.parse().ok()?;
                let egress_v4 = parse_opt::<Ipv4Addr>(p.next()?)?;
                let egress_v6 = parse_opt::<Ipv6Addr>(p.next()?)?;
                gateways.push(Gateway { node_ip, egress_v4, egress_v6 });
            }
            Record::Group(id, Some(EgressGroup { gateways }))
        }
        "group-" => Record::Group(GroupId(f.next()?.parse().ok()?), None),
        "route" => {
            let net = f.next()?.parse().ok()?;
            let via_node = f.next()?.parse().ok()?;
            Record::Route(net, Some(Route { via_node }))
        }
        "route-" => Record::Route(f.next()?.parse().ok()?, None),
        _ => return None,
    };
    if f.next().is_some() && !matches!(rec, Record::Group(..)) {
        return None;
    }
    Some(rec)
}

/// The journal file and the state it describes.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    pub state: Shadow,
}

impl Journal {
    /// Loads (a missing file is an empty shadow), compacts, and opens for appending.
    pub fn open(path: &Path) -> io::Result<Journal> {
        let mut state = Shadow::default();
        match fs::read_to_string(path) {
            Ok(text) => {
                for rec in text.lines().filter_map(decode) {
                    state.apply(&rec);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        // Compact through a temporary file and a rename, so a crash leaves either journal whole.
        let tmp = path.with_extension("tmp");
        {
            let mut f = File::create(&tmp)?;
            let mut buf = String::new();
            for r in state.records() {
                buf.push_str(&encode(&r));
                buf.push('\n');
            }
            f.write_all(buf.as_bytes())?;
            f.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        let file = OpenOptions::new().append(true).open(path)?;
        Ok(Journal { path: path.to_owned(), file, state })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records `r` (before the map op, so a crash in between leaves a shadow the kernel does not confirm: ignored).
    pub fn append(&mut self, r: Record) -> io::Result<()> {
        let mut line = encode(&r);
        line.push('\n');
        self.file.write_all(line.as_bytes())?;
        self.state.apply(&r);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_skipped() {
        let recs = vec![
            Record::Ipcache(
                "10.2.1.0/24".parse().unwrap(),
                Some(IpcacheValue {
                    identity: 7,
                    cluster_id: 3,
                    tunnel_endpoint: Some("fd00::1".parse().unwrap()),
                    encrypt_key: 2,
                }),
            ),
            Record::Ipcache("fd02::/64".parse().unwrap(), None),
            Record::Group(
                GroupId(5),
                Some(EgressGroup {
                    gateways: vec![
                        Gateway {
                            node_ip: "192.168.0.2".parse().unwrap(),
                            egress_v4: Some("203.0.113.9".parse().unwrap()),
                            egress_v6: None,
                        },
                        Gateway { node_ip: "192.168.0.3".parse().unwrap(), egress_v4: None, egress_v6: None },
                    ],
                }),
            ),
            Record::Group(GroupId(6), Some(EgressGroup::default())),
            Record::Group(GroupId(5), None),
            Record::Route("10.9.0.0/16".parse().unwrap(), Some(Route { via_node: "192.168.0.9".parse().unwrap() })),
            Record::Route("10.9.0.0/16".parse().unwrap(), None),
        ];
        for r in &recs {
            assert_eq!(decode(&encode(r)).as_ref(), Some(r), "{}", encode(r));
        }
        for bad in ["", "ipcache", "ipcache 10.0.0.0/8 x 1 - 0", "group 1 nonsense", "route 10.0.0.0/8", "zzz 1"] {
            assert_eq!(decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn journal_replays_and_compacts() {
        let dir = std::env::temp_dir().join(format!("cw-shadow-{}", std::process::id()));
        let path = dir.join("shadow");
        let _ = fs::remove_file(&path);
        let net: IpNet = "10.1.0.0/24".parse().unwrap();
        let v = IpcacheValue { identity: 9, cluster_id: 1, tunnel_endpoint: None, encrypt_key: 1 };
        {
            let mut j = Journal::open(&path).unwrap();
            j.append(Record::Ipcache(net, Some(v))).unwrap();
            j.append(Record::Ipcache("10.2.0.0/24".parse().unwrap(), Some(v))).unwrap();
            j.append(Record::Ipcache("10.2.0.0/24".parse().unwrap(), None)).unwrap();
        }
        // A torn line from a crash mid-write.
        OpenOptions::new().append(true).open(&path).unwrap().write_all(b"ipcache 10.3.0.0/24 1").unwrap();
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.state.ipcache.len(), 1);
        assert_eq!(j.state.ipcache[&net], v);
        assert_eq!(fs::read_to_string(&path).unwrap().lines().count(), 1, "compacted");
        let _ = fs::remove_dir_all(&dir);
    }
}
