//! etcd users and roles for the mesh, and enabling auth.
//!
//! With `--client-cert-auth`, etcd takes the user from the client certificate's CN, so
//! users are created without passwords and certificates (from `causeway-pki`) are the
//! credentials.

use std::collections::BTreeSet;

use etcd_client::{Client, Permission, PermissionType, UserAddOptions};

use crate::list::prefix_end;
use crate::{cluster_config_key, KvError, HAS_CLUSTER_CONFIG_KEY, HEARTBEAT_KEY};

/// Role granted to every `remote-<peer>` user: read-only access to what peers import.
pub const REMOTE_ROLE: &str = "remote";
/// Role granted to `admin-<cluster>`: read-write on every key.
pub const ADMIN_ROLE: &str = "admin";
/// etcd's built-in superuser role.
pub const ROOT_ROLE: &str = "root";
/// Prefix of the read-only user each peer cluster reads this cluster's etcd as (`remote-<peer>`).
pub const REMOTE_USER_PREFIX: &str = "remote-";
/// The user (and its role of the same name) external workloads (VMs) connect as, as in
/// Cilium: they read the whole store and register themselves under
/// [`NODE_REGISTER_PREFIX`].
pub const EXTERNAL_WORKLOAD_USER: &str = "externalworkload";
/// Role of [`EXTERNAL_WORKLOAD_USER`]; see [`external_workload_grants`].
pub const EXTERNAL_WORKLOAD_ROLE: &str = "externalworkload";
/// Where an external workload writes its node registration.
pub const NODE_REGISTER_PREFIX: &str = "cilium/state/noderegister/v1/";
/// Cilium's kvstore lock prefix: an external workload's agent takes its locks there.
pub const INIT_LOCK_PREFIX: &str = "cilium/.initlock/";

/// One permission, as etcd stores it (key and range end are raw bytes).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Grant {
    /// Read, write or both.
    pub kind: GrantKind,
    /// First key.
    pub key: Vec<u8>,
    /// Exclusive end; empty for a single key.
    pub range_end: Vec<u8>,
}

/// Access a [`Grant`] gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GrantKind {
    /// Read only.
    Read,
    /// Read and write.
    ReadWrite,
}

impl Grant {
    /// Read access to one key.
    pub fn read_key(key: &str) -> Self {
        Self { kind: GrantKind::Read, key: key.as_bytes().to_vec(), range_end: Vec::new() }
    }

    /// Read access to every key under `prefix`.
    pub fn read_prefix(prefix: &str) -> Self {
        Self { kind: GrantKind::Read, key: prefix.as_bytes().to_vec(), range_end: prefix_end(prefix.as_bytes()) }
    }

    /// Read-write access to every key.
    pub fn read_write_all() -> Self {
        Self { kind: GrantKind::ReadWrite, key: vec![0], range_end: vec![0] }
    }

    /// Read access to every key (etcd's `--from-key ''`: key `\0`, range end `\0`).
    pub fn read_all() -> Self {
        Self { kind: GrantKind::Read, key: vec![0], range_end: vec![0] }
    }

    /// Read-write access to every key under `prefix`.
    pub fn read_write_prefix(prefix: &str) -> Self {
        Self { kind: GrantKind::ReadWrite, key: prefix.as_bytes().to_vec(), range_end: prefix_end(prefix.as_bytes()) }
    }

    fn perm_type(&self) -> PermissionType {
        match self.kind {
            GrantKind::Read => PermissionType::Read,
            GrantKind::ReadWrite => PermissionType::Readwrite,
        }
    }

    fn to_permission(&self) -> Permission {
        let p = Permission::new(self.perm_type(), self.key.clone());
        if self.range_end.is_empty() {
            p
        } else {
            p.with_range_end(self.range_end.clone())
        }
    }

    fn matches(&self, p: &Permission) -> bool {
        p.get_type() == self.perm_type() as i32
            && p.key() == self.key.as_slice()
            && p.range_end() == self.range_end.as_slice()
    }
}

/// What a `remote-<peer>` user may read in the etcd of cluster `local_cluster`.
pub fn remote_grants(local_cluster: &str) -> Vec<Grant> {
    vec![
        Grant::read_prefix("cilium/state/"),
        Grant::read_key(&cluster_config_key(local_cluster)),
        Grant::read_prefix(&format!("cilium/synced/{local_cluster}/")),
        Grant::read_key(HEARTBEAT_KEY),
        Grant::read_key(HAS_CLUSTER_CONFIG_KEY),
    ]
}

/// What [`EXTERNAL_WORKLOAD_USER`] may do, as Cilium grants it: read every key, and read-write
/// under [`NODE_REGISTER_PREFIX`] (its registration) and [`INIT_LOCK_PREFIX`] (its locks).
/// Nothing else: it cannot touch the exported state, the cluster config or the canaries.
pub fn external_workload_grants() -> Vec<Grant> {
    vec![Grant::read_all(), Grant::read_write_prefix(NODE_REGISTER_PREFIX), Grant::read_write_prefix(INIT_LOCK_PREFIX)]
}

/// Creates (or converges) the users and roles of the etcd of cluster `local_cluster`,
/// then enables auth:
///
/// * `root` with the `root` role;
/// * `admin-<local_cluster>` with role [`ADMIN_ROLE`] (read-write on every key);
/// * `remote-<peer>` for every peer, with role [`REMOTE_ROLE`] ([`remote_grants`]);
/// * [`EXTERNAL_WORKLOAD_USER`] with role [`EXTERNAL_WORKLOAD_ROLE`]
///   ([`external_workload_grants`]).
///
/// Idempotent: existing users and roles are kept, missing permissions granted and
/// permissions no longer wanted revoked. Works before and after auth is enabled, as
/// long as `client` is `root` (its certificate's CN is `root`).
#[tracing::instrument(skip_all, fields(cluster = local_cluster))]
pub async fn ensure_auth<S: AsRef<str>>(client: &mut Client, local_cluster: &str, peers: &[S]) -> Result<(), KvError> {
    ensure_role(client, REMOTE_ROLE, &remote_grants(local_cluster)).await?;
    ensure_role(client, ADMIN_ROLE, &[Grant::read_write_all()]).await?;
    ensure_role(client, EXTERNAL_WORKLOAD_ROLE, &external_workload_grants()).await?;
    ensure_user(client, "root", ROOT_ROLE).await?;
    ensure_user(client, &format!("admin-{local_cluster}"), ADMIN_ROLE).await?;
    ensure_user(client, EXTERNAL_WORKLOAD_USER, EXTERNAL_WORKLOAD_ROLE).await?;
    for peer in peers {
        ensure_user(client, &format!("remote-{}", peer.as_ref()), REMOTE_ROLE).await?;
    }
    client.auth_enable().await.map_err(|e| KvError::request("auth enable", local_cluster, e))?;
    tracing::info!(peers = peers.len(), "etcd users and roles ensured; auth enabled");
    Ok(())
}

async fn ensure_role(client: &mut Client, role: &str, grants: &[Grant]) -> Result<(), KvError> {
    let roles = client.role_list().await.map_err(|e| KvError::request("role list", role, e))?;
    if !roles.roles().iter().any(|r| r == role) {
        client.role_add(role).await.map_err(|e| KvError::request("role add", role, e))?;
    }
    let existing = client.role_get(role).await.map_err(|e| KvError::request("role get", role, e))?.permissions();
    for grant in grants {
        if !existing.iter().any(|p| grant.matches(p)) {
            client
                .role_grant_permission(role, grant.to_permission())
                .await
                .map_err(|e| KvError::request("role grant permission", role, e))?;
        }
    }
    for p in &existing {
        if !grants.iter().any(|g| g.matches(p)) {
            let opts = (!p.range_end().is_empty())
                .then(|| etcd_client::RoleRevokePermissionOptions::new().with_range_end(p.range_end()));
            client
                .role_revoke_permission(role, p.key(), opts)
                .await
                .map_err(|e| KvError::request("role revoke permission", role, e))?;
        }
    }
    Ok(())
}

async fn ensure_user(client: &mut Client, user: &str, role: &str) -> Result<(), KvError> {
    let users = client.user_list().await.map_err(|e| KvError::request("user list", user, e))?;
    if !users.users().iter().any(|u| u == user) {
        client
            .user_add(user, "", Some(UserAddOptions::new().with_no_pwd()))
            .await
            .map_err(|e| KvError::request("user add", user, e))?;
    }
    let has_role = client
        .user_get(user)
        .await
        .map_err(|e| KvError::request("user get", user, e))?
        .roles()
        .iter()
        .any(|r| r == role);
    if !has_role {
        client.user_grant_role(user, role).await.map_err(|e| KvError::request("user grant role", user, e))?;
    }
    Ok(())
}

/// What [`plan_peer_users`] decided: the `remote-<peer>` users to create, the ones to keep (and whose role to
/// check), and the ones to delete. Sorted, without duplicates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerUserPlan {
    /// Users of wanted peers that etcd does not have yet.
    pub add: Vec<String>,
    /// Users of wanted peers that etcd already has.
    pub keep: Vec<String>,
    /// `remote-*` users of peers no longer wanted: their read access is revoked by deleting them.
    pub remove: Vec<String>,
}

impl PeerUserPlan {
    /// Whether applying the plan changes which users exist.
    pub fn changes_users(&self) -> bool {
        !self.add.is_empty() || !self.remove.is_empty()
    }
}

/// The etcd user a peer cluster reads this cluster's etcd as.
pub fn remote_user(peer: &str) -> String {
    format!("{REMOTE_USER_PREFIX}{peer}")
}

/// Decides, from the wanted peers and the users etcd has, which `remote-<peer>` users to add and which to delete.
///
/// Only users named `remote-…` are ever removed: `root`, `admin-<cluster>`, [`EXTERNAL_WORKLOAD_USER`] and any
/// user someone else created are not this function's business. An empty wanted set removes every `remote-*`
/// user: the caller decides whether an empty set is a real answer (a ConfigMap read) or no answer yet.
pub fn plan_peer_users<P: AsRef<str>, U: AsRef<str>>(wanted_peers: &[P], existing_users: &[U]) -> PeerUserPlan {
    let wanted: BTreeSet<String> =
        wanted_peers.iter().map(|p| p.as_ref()).filter(|p| !p.is_empty()).map(remote_user).collect();
    let existing: BTreeSet<&str> = existing_users.iter().map(|u| u.as_ref()).collect();
    let mut plan = PeerUserPlan::default();
    for user in &wanted {
        if existing.contains(user.as_str()) {
            plan.keep.push(user.clone());
        } else {
            plan.add.push(user.clone());
        }
    }
    plan.remove = existing
        .iter()
        .filter(|u| u.starts_with(REMOTE_USER_PREFIX) && !wanted.contains(**u))
        .map(|u| u.to_string())
        .collect();
    plan
}

/// Converges the `remote-<peer>` users of the etcd of cluster `local_cluster` to exactly `peers`: lists the users,
/// decides with [`plan_peer_users`], creates missing users with role [`REMOTE_ROLE`] (ensuring the role and its
/// grants first, as [`ensure_auth`] does) and deletes the users of peers no longer wanted, which revokes their
/// read access at once (etcd checks the certificate's user on every request).
///
/// Does not enable auth nor create the other users: [`ensure_auth`] does that, and callers run it first when
/// there is any peer. `client` must be `root`. Returns what it did.
#[tracing::instrument(skip_all, fields(cluster = local_cluster, peers = peers.len()))]
pub async fn sync_peer_users<S: AsRef<str>>(
    client: &mut Client,
    local_cluster: &str,
    peers: &[S],
) -> Result<PeerUserPlan, KvError> {
    let users = client.user_list().await.map_err(|e| KvError::request("user list", local_cluster, e))?;
    let plan = plan_peer_users(peers, users.users());
    if !plan.add.is_empty() || !plan.keep.is_empty() {
        ensure_role(client, REMOTE_ROLE, &remote_grants(local_cluster)).await?;
    }
    for user in plan.add.iter().chain(&plan.keep) {
        ensure_user(client, user, REMOTE_ROLE).await?;
    }
    for user in &plan.remove {
        match client.user_delete(user.as_str()).await {
            Ok(_) => {}
            // Someone else deleted it between the list and now: the outcome we want.
            Err(e) if e.to_string().contains("user name not found") => {}
            Err(e) => return Err(KvError::request("user delete", user.as_str(), e)),
        }
    }
    if plan.changes_users() {
        tracing::debug!(added = ?plan.add, removed = ?plan.remove, "peer etcd users converged");
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn adds_missing_peers_and_keeps_present_ones() {
        let plan = plan_peer_users(&["east", "south"], &["root", "admin-west", "remote-east"]);
        assert_eq!(plan.add, users(&["remote-south"]));
        assert_eq!(plan.keep, users(&["remote-east"]));
        assert!(plan.remove.is_empty());
        assert!(plan.changes_users());
    }

    #[test]
    fn removes_only_remote_users_of_peers_no_longer_wanted() {
        let existing = [
            "root",
            "admin-west",
            "admin-south",
            EXTERNAL_WORKLOAD_USER,
            "stranger",
            "remotely-ok",
            "remote-east",
            "remote-south",
        ];
        let plan = plan_peer_users(&["east"], &existing);
        assert_eq!(plan.remove, users(&["remote-south"]));
        assert_eq!(plan.keep, users(&["remote-east"]));
        assert!(plan.add.is_empty());
    }

    #[test]
    fn no_peers_removes_every_remote_user_and_nothing_else() {
        let plan =
            plan_peer_users::<&str, &str>(&[], &["root", "admin-west", "remote-a", "remote-b", "externalworkload"]);
        assert_eq!(plan.remove, users(&["remote-a", "remote-b"]));
        assert!(plan.add.is_empty() && plan.keep.is_empty());
    }

    #[test]
    fn converged_state_is_a_no_op_and_duplicates_collapse() {
        let plan = plan_peer_users(&["east", "east", "south", ""], &["root", "remote-east", "remote-south"]);
        assert_eq!(plan, PeerUserPlan { add: vec![], keep: users(&["remote-east", "remote-south"]), remove: vec![] });
        assert!(!plan.changes_users());
    }

    #[test]
    fn empty_etcd_adds_every_peer_sorted() {
        let plan = plan_peer_users::<&str, &str>(&["south", "east"], &[]);
        assert_eq!(plan.add, users(&["remote-east", "remote-south"]));
    }
}
