//! Resolving a process's [`User`] to ids: `user[:group]` names looked up in the
//! container root's `/etc/passwd` and `/etc/group`, the way an image's `USER` works.

use std::path::{Path, PathBuf};

use crate::protocol::User;

/// Ids a process runs with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedUser {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// Why a user could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// A user name with no `/etc/passwd` entry.
    #[error("user {0} not found in /etc/passwd")]
    UserNotFound(String),
    /// A group name with no `/etc/group` entry.
    #[error("group {0} not found in /etc/group")]
    GroupNotFound(String),
    /// The file exists but could not be read.
    #[error("read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// One `/etc/passwd` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PasswdEntry {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

/// One `/etc/group` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupEntry {
    /// Group name.
    pub name: String,
    /// Group id.
    pub gid: u32,
    /// Member user names.
    pub members: Vec<String>,
}

/// Parses `/etc/passwd` (`name:pw:uid:gid:gecos:home:shell`); malformed lines are skipped.
pub fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 || f[0].is_empty() || line.starts_with('#') {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_owned(),
                uid: f[2].trim().parse().ok()?,
                gid: f[3].trim().parse().ok()?,
            })
        })
        .collect()
}

/// Parses `/etc/group` (`name:pw:gid:member,member`); malformed lines are skipped.
pub fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 3 || f[0].is_empty() || line.starts_with('#') {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_owned(),
                gid: f[2].trim().parse().ok()?,
                members: f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .map(str::trim)
                            .filter(|m| !m.is_empty())
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// A missing file is an empty database; an unreadable one is an error.
fn read_db(root: &Path, rel: &str) -> Result<String, UserError> {
    let path = root.join(rel);
    match std::fs::read_to_string(&path) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(source) => Err(UserError::Read { path, source }),
    }
}

/// The ids `user` stands for inside the container whose root is `root`.
///
/// Without a name, the numeric ids are used as given. With `name` = `user[:group]`:
/// a user name must exist in `/etc/passwd` and gives uid and primary gid; a number
/// not listed there is used as the uid with `user.gid`. The group part, a name or a
/// number, replaces the primary gid. Supplementary groups are `additional_gids` plus
/// every `/etc/group` entry listing the user name.
pub fn resolve(root: &Path, user: &User) -> Result<ResolvedUser, UserError> {
    let Some(spec) = user.name.as_deref().filter(|n| !n.is_empty()) else {
        return Ok(ResolvedUser {
            uid: user.uid,
            gid: user.gid,
            groups: user.additional_gids.clone(),
        });
    };
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = parse_passwd(&read_db(root, "etc/passwd")?);
    let entry = match user_part.parse::<u32>() {
        Ok(uid) => passwd
            .into_iter()
            .find(|e| e.uid == uid)
            .or(Some(PasswdEntry {
                name: String::new(),
                uid,
                gid: user.gid,
            })),
        Err(_) => passwd.into_iter().find(|e| e.name == user_part),
    }
    .ok_or_else(|| UserError::UserNotFound(user_part.to_owned()))?;

    let groups_db = parse_group(&read_db(root, "etc/group")?);
    let gid = match group_part {
        None | Some("") => entry.gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => groups_db
                .iter()
                .find(|e| e.name == g)
                .map(|e| e.gid)
                .ok_or_else(|| UserError::GroupNotFound(g.to_owned()))?,
        },
    };
    let mut groups = user.additional_gids.clone();
    if !entry.name.is_empty() {
        for g in groups_db.iter().filter(|g| g.members.contains(&entry.name)) {
            if !groups.contains(&g.gid) {
                groups.push(g.gid);
            }
        }
    }
    Ok(ResolvedUser {
        uid: entry.uid,
        gid,
        groups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # a comment\n\
        nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n\
        www:x:33:33::/var/www:/bin/false\n\
        broken line\n\
        bad:x:notanumber:1::/:/bin/sh\n\
        app:x:1000:1000::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nwww:x:33:\nwheel:x:10:app,root\naudio:x:29: app \n\
        junk\nstaff:x:50:\n";

    fn root() -> tempfile_like::TempDir {
        let dir = tempfile_like::TempDir::new();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/passwd"), PASSWD).unwrap();
        std::fs::write(dir.path().join("etc/group"), GROUP).unwrap();
        dir
    }

    /// A self-deleting temp directory (the crate has no dev-dependencies to spare).
    mod tempfile_like {
        pub struct TempDir(std::path::PathBuf);
        impl TempDir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p = std::env::temp_dir()
                    .join(format!("forkvm-agent-user-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&p).unwrap();
                TempDir(p)
            }
            pub fn path(&self) -> &std::path::Path {
                &self.0
            }
        }
        impl Drop for TempDir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn named(name: &str) -> User {
        User {
            uid: 7,
            gid: 8,
            additional_gids: vec![],
            name: Some(name.into()),
        }
    }

    #[test]
    fn parsers_skip_malformed_lines() {
        let p = parse_passwd(PASSWD);
        let names: Vec<_> = p.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["root", "nobody", "www", "app"]);
        let g = parse_group(GROUP);
        assert_eq!(g.len(), 5);
        assert_eq!(g[2].members, ["app", "root"]);
        assert_eq!(g[3].members, ["app"]);
        assert!(parse_passwd("\0\n::::\n:x:1:1\n").is_empty());
    }

    #[test]
    fn names_resolve_against_the_container_root() {
        let dir = root();
        let r = |n: &str| resolve(dir.path(), &named(n));
        assert_eq!(
            r("nobody").unwrap(),
            ResolvedUser {
                uid: 65534,
                gid: 65534,
                groups: vec![]
            }
        );
        assert_eq!(
            r("www:www").unwrap(),
            ResolvedUser {
                uid: 33,
                gid: 33,
                groups: vec![]
            }
        );
        assert_eq!(
            r("app").unwrap(),
            ResolvedUser {
                uid: 1000,
                gid: 1000,
                groups: vec![10, 29]
            }
        );
        assert_eq!(r("app:staff").unwrap().gid, 50);
        assert_eq!(r("1000").unwrap().uid, 1000);
        assert_eq!(r("1000").unwrap().gid, 1000);
        // A number with no entry is taken as is, with the spec's gid.
        assert_eq!(
            r("4242:99").unwrap(),
            ResolvedUser {
                uid: 4242,
                gid: 99,
                groups: vec![]
            }
        );
        assert_eq!(r("4242").unwrap().gid, 8);
    }

    #[test]
    fn unknown_names_are_clear_errors() {
        let dir = root();
        let e = resolve(dir.path(), &named("ghost")).unwrap_err();
        assert_eq!(e.to_string(), "user ghost not found in /etc/passwd");
        let e = resolve(dir.path(), &named("www:ghosts")).unwrap_err();
        assert_eq!(e.to_string(), "group ghosts not found in /etc/group");
        // A root without an /etc/passwd knows no names.
        let empty = tempfile_like::TempDir::new();
        assert!(matches!(
            resolve(empty.path(), &named("nobody")),
            Err(UserError::UserNotFound(_))
        ));
        assert_eq!(resolve(empty.path(), &named("5")).unwrap().uid, 5);
    }

    #[test]
    fn without_a_name_the_numeric_ids_apply() {
        let u = User {
            uid: 1,
            gid: 2,
            additional_gids: vec![3, 4],
            name: None,
        };
        assert_eq!(
            resolve(Path::new("/nonexistent"), &u).unwrap(),
            ResolvedUser {
                uid: 1,
                gid: 2,
                groups: vec![3, 4]
            }
        );
    }
}
