//! Room policies by namespace: a room name's prefix selects who may enter
//! the room, who may post in it, and how far back its members may read.
//!
//! Written as `PREFIX=ACCESS[,send=ROLE|ROLE...][,history=all|since_join]`,
//! for example `public:=open` or `news:=members,send=admin,history=since_join`.
//! The longest matching prefix wins; the empty prefix is the default
//! (`=members` unless configured). Without any configuration:
//! `public:=open` and `=members`.

use std::fmt;

use anyhow::{Context, bail};

/// Who may enter a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Any authenticated user may join, read and post.
    Open,
    /// Only members: granted by the application (server API) or allowed
    /// by the user's token (`rooms` claim). Join, history, send, react,
    /// typing and resume all need it.
    Members,
}

/// How far back a member may read a room's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryVisibility {
    /// Everything the room kept.
    All,
    /// Only messages from the time the membership was granted (members
    /// allowed by their token, who have no grant time, see everything).
    SinceJoin,
}

/// The rules of one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Room-name prefix this policy applies to ("" is the default).
    pub prefix: String,
    /// Who may enter.
    pub access: Access,
    /// Roles that may post (send, react, typing); empty: everyone who may
    /// enter. An announcement channel lists its posting roles here.
    pub send_roles: Vec<String>,
    /// History from before a member joined.
    pub history: HistoryVisibility,
}

impl Policy {
    /// Whether a member with `role` (`None`: no granted role, e.g. allowed
    /// by an open room or a token) may post.
    pub fn may_post(&self, role: Option<&str>) -> bool {
        self.send_roles.is_empty() || role.is_some_and(|r| self.send_roles.iter().any(|s| s == r))
    }

    /// Parses `PREFIX=ACCESS[,send=ROLES][,history=all|since_join]`.
    pub fn parse(spec: &str) -> anyhow::Result<Policy> {
        let (prefix, rest) = spec
            .split_once('=')
            .with_context(|| format!("room policy {spec:?}: expected PREFIX=ACCESS"))?;
        let mut parts = rest.split(',').map(str::trim);
        let access = match parts.next() {
            Some("open") => Access::Open,
            Some("members") => Access::Members,
            other => bail!("room policy {spec:?}: access must be open or members, not {other:?}"),
        };
        let mut policy = Policy {
            prefix: prefix.trim().to_owned(),
            access,
            send_roles: Vec::new(),
            history: HistoryVisibility::All,
        };
        for part in parts {
            match part.split_once('=') {
                Some(("send", roles)) => {
                    policy.send_roles = roles
                        .split('|')
                        .map(str::trim)
                        .filter(|r| !r.is_empty())
                        .map(str::to_owned)
                        .collect();
                }
                Some(("history", "all")) => policy.history = HistoryVisibility::All,
                Some(("history", "since_join")) => policy.history = HistoryVisibility::SinceJoin,
                _ => bail!("room policy {spec:?}: unknown setting {part:?}"),
            }
        }
        Ok(policy)
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let access = match self.access {
            Access::Open => "open",
            Access::Members => "members",
        };
        write!(f, "{}={access}", self.prefix)?;
        if !self.send_roles.is_empty() {
            write!(f, ",send={}", self.send_roles.join("|"))?;
        }
        if self.history == HistoryVisibility::SinceJoin {
            write!(f, ",history=since_join")?;
        }
        Ok(())
    }
}

/// Every configured policy, looked up by room name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policies {
    /// Longest prefix first; always ends with the default ("" prefix).
    list: Vec<Policy>,
}

impl Default for Policies {
    fn default() -> Self {
        Policies::from_specs(&["public:=open".to_owned()]).unwrap_or_else(|_| Policies {
            list: vec![default_policy()],
        })
    }
}

fn default_policy() -> Policy {
    Policy {
        prefix: String::new(),
        access: Access::Members,
        send_roles: Vec::new(),
        history: HistoryVisibility::All,
    }
}

impl Policies {
    /// Policies from their written forms; a default `=members` is added
    /// unless one has the empty prefix. Two policies for one prefix are an
    /// error (which one was meant?).
    pub fn from_specs(specs: &[String]) -> anyhow::Result<Policies> {
        let mut list = Vec::with_capacity(specs.len() + 1);
        for spec in specs.iter().filter(|s| !s.trim().is_empty()) {
            let p = Policy::parse(spec)?;
            if list.iter().any(|q: &Policy| q.prefix == p.prefix) {
                bail!("two room policies for the prefix {:?}", p.prefix);
            }
            list.push(p);
        }
        if !list.iter().any(|p| p.prefix.is_empty()) {
            list.push(default_policy());
        }
        list.sort_by_key(|p| std::cmp::Reverse(p.prefix.len()));
        Ok(Policies { list })
    }

    /// The policy of `room`: its longest matching prefix.
    pub fn for_room(&self, room: &str) -> &Policy {
        self.list
            .iter()
            .find(|p| room.starts_with(p.prefix.as_str()))
            .unwrap_or_else(|| &self.list[self.list.len() - 1])
    }

    /// The policies, longest prefix first (for logs and `/health`).
    pub fn iter(&self) -> impl Iterator<Item = &Policy> {
        self.list.iter()
    }
}

/// Whether a token's `rooms` claim allows `room`: an exact name, or a
/// prefix ending in `*` (`*` alone allows every room).
pub fn token_allows(patterns: &[String], room: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => room.starts_with(prefix),
        None => p == room,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins_and_the_default_is_members() {
        let p = Policies::default();
        assert_eq!(p.for_room("public:lobby").access, Access::Open);
        assert_eq!(p.for_room("team-1").access, Access::Members);
        assert_eq!(p.for_room("publicity").access, Access::Members);

        let p = Policies::from_specs(&[
            "news:=members,send=admin|editor,history=since_join".into(),
            "news:open:=open".into(),
            "=open".into(),
        ])
        .unwrap();
        let news = p.for_room("news:world");
        assert_eq!(news.access, Access::Members);
        assert_eq!(news.history, HistoryVisibility::SinceJoin);
        assert!(news.may_post(Some("editor")));
        assert!(!news.may_post(Some("member")));
        assert!(!news.may_post(None));
        assert_eq!(p.for_room("news:open:x").access, Access::Open);
        assert_eq!(p.for_room("anything").access, Access::Open);
        assert_eq!(
            news.to_string(),
            "news:=members,send=admin|editor,history=since_join"
        );
    }

    #[test]
    fn bad_specs_are_refused() {
        for bad in ["public:", "x=closed", "x=open,send", "x=open,history=never"] {
            assert!(Policy::parse(bad).is_err(), "{bad}");
        }
        assert!(Policies::from_specs(&["a=open".into(), "a=members".into()]).is_err());
    }

    #[test]
    fn token_patterns() {
        let claim = vec!["team-1:*".to_owned(), "dm:a:b".to_owned()];
        assert!(token_allows(&claim, "team-1:general"));
        assert!(token_allows(&claim, "dm:a:b"));
        assert!(!token_allows(&claim, "dm:a:bc"));
        assert!(!token_allows(&claim, "team-2:general"));
        assert!(token_allows(&["*".to_owned()], "anything"));
        assert!(!token_allows(&[], "anything"));
    }
}
