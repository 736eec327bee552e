//! Namespaces and channel permissions: who may subscribe to and publish on which channel.
//!
//! A channel's namespace is the text before its first `:` (`chat:room1` → `chat`); a channel
//! without `:` belongs to the default namespace. Rules come from the config file (`[channels]`
//! for the default namespace, `[namespaces.NAME]` for the others) and are resolved once at start
//! into a [`Policy`] that each shard holds.
//!
//! Decisions are pure functions of the rules, the connection's user and the command; every
//! unknown case denies. Cost: when the policy is open (no auth, no namespaces declared, default
//! rules), [`Policy::is_open`] lets the hot path skip every check; otherwise a check is one
//! search for `:` and one small hash lookup.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// History settings of a namespace, resolved (see `crate::history::HistoryOptions`; kept as
/// plain values here because this module imports nothing of ours).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct History {
    /// Messages kept per channel (> 0).
    pub size: usize,
    /// How long messages are kept. Default 5 min.
    pub ttl: Duration,
    /// How long a silent channel's position (epoch, top offset) is remembered. Default 24 h.
    pub meta_ttl: Duration,
}

/// Default `history_ttl`.
pub const DEFAULT_HISTORY_TTL: Duration = Duration::from_secs(300);
/// Default `history_meta_ttl`.
pub const DEFAULT_HISTORY_META_TTL: Duration = Duration::from_secs(24 * 3600);

/// Who may subscribe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeRule {
    /// Any connection, anonymous ones included.
    Anonymous,
    /// Connections whose token has a non-empty `sub`.
    Authenticated,
    /// Only with a channel token for this channel and this user.
    Token,
    /// Nobody (backends still publish to it).
    None,
}

/// Who may do something that is not subscribing (publish from a client, read history, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Nobody from a client (backends always may).
    None,
    /// Connections subscribed to the channel.
    Subscribers,
    /// Connections whose token has a non-empty `sub`.
    Authenticated,
    /// Any connection.
    Anonymous,
}

impl SubscribeRule {
    pub fn parse(s: &str) -> Option<SubscribeRule> {
        Some(match s {
            "anonymous" => SubscribeRule::Anonymous,
            "authenticated" => SubscribeRule::Authenticated,
            "token" => SubscribeRule::Token,
            "none" => SubscribeRule::None,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            SubscribeRule::Anonymous => "anonymous",
            SubscribeRule::Authenticated => "authenticated",
            SubscribeRule::Token => "token",
            SubscribeRule::None => "none",
        }
    }
}

impl Access {
    pub fn parse(s: &str) -> Option<Access> {
        Some(match s {
            "none" => Access::None,
            "subscribers" => Access::Subscribers,
            "authenticated" => Access::Authenticated,
            "anonymous" => Access::Anonymous,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Access::None => "none",
            Access::Subscribers => "subscribers",
            Access::Authenticated => "authenticated",
            Access::Anonymous => "anonymous",
        }
    }
}

/// One namespace's rules as configured; `None` = the mode's default (with `[auth]`: subscribe
/// `authenticated`, publish `none`; without: `anonymous` for both).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespaceRules {
    pub subscribe: Option<SubscribeRule>,
    pub publish: Option<Access>,
    /// `name#17,42` may only be subscribed by users `17` and `42`.
    pub user_limited: bool,
    /// `history_size`: messages kept per channel; 0 or `None` = no history (the default).
    pub history_size: Option<usize>,
    /// `history_ttl`: how long messages are kept (default 5 min).
    pub history_ttl: Option<Duration>,
    /// `history_meta_ttl`: how long a silent channel's position is remembered (default 24 h).
    pub history_meta_ttl: Option<Duration>,
    /// `history`: who may read history with the client `history` command (default
    /// `subscribers`; backends always may through `GET /history`).
    pub history: Option<Access>,
}

/// The `[channels]` and `[namespaces.*]` tables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Namespaces {
    /// Rules of channels without `:`, and of every channel when no namespace is declared.
    pub default: NamespaceRules,
    /// Declared namespaces by name.
    pub named: BTreeMap<String, NamespaceRules>,
}

/// Rules with the mode's defaults applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    pub subscribe: SubscribeRule,
    pub publish: Access,
    pub user_limited: bool,
    /// `Some` when the namespace keeps history.
    pub history: Option<History>,
    /// Who may read history from a client.
    pub history_access: Access,
}

impl Rules {
    fn resolve(r: &NamespaceRules, auth: bool) -> Rules {
        let (sub, publish) = if auth {
            (SubscribeRule::Authenticated, Access::None)
        } else {
            (SubscribeRule::Anonymous, Access::Anonymous)
        };
        let history = match r.history_size {
            Some(size) if size > 0 => Some(History {
                size,
                ttl: r.history_ttl.unwrap_or(DEFAULT_HISTORY_TTL),
                meta_ttl: r.history_meta_ttl.unwrap_or(DEFAULT_HISTORY_META_TTL),
            }),
            _ => None,
        };
        Rules {
            subscribe: r.subscribe.unwrap_or(sub),
            publish: r.publish.unwrap_or(publish),
            user_limited: r.user_limited,
            history,
            history_access: r.history.unwrap_or(Access::Subscribers),
        }
    }
}

/// Why a command was refused. Maps onto the protocol's error codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// The channel's namespace is not declared (`unknown_namespace`).
    UnknownNamespace(String),
    /// Not allowed (`permission_denied`); the text says why.
    PermissionDenied(&'static str),
}

/// Resolved rules for every namespace, held by each shard.
#[derive(Debug, Clone)]
pub struct Policy {
    default: Rules,
    named: HashMap<Box<str>, Rules>,
    /// Namespaces were declared: channels of other namespaces are refused.
    declared: bool,
    open: bool,
    /// Some namespace keeps history.
    any_history: bool,
}

impl Policy {
    /// Resolve the configured rules for a hub with (`auth`) or without tokens.
    pub fn new(ns: &Namespaces, auth: bool) -> Policy {
        let default = Rules::resolve(&ns.default, auth);
        let named: HashMap<Box<str>, Rules> = ns
            .named
            .iter()
            .map(|(k, v)| (Box::from(k.as_str()), Rules::resolve(v, auth)))
            .collect();
        let open = !auth
            && named.is_empty()
            && default.subscribe == SubscribeRule::Anonymous
            && default.publish == Access::Anonymous
            && !default.user_limited;
        let any_history = default.history.is_some() || named.values().any(|r| r.history.is_some());
        Policy {
            default,
            declared: !named.is_empty(),
            named,
            open,
            any_history,
        }
    }

    /// True when every check passes for everyone (open mode with default rules): callers skip
    /// the checks entirely, so the feature costs nothing when it is off.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// The history settings of `channel`, when its namespace keeps history. Cost when no
    /// namespace does: one branch.
    pub fn history(&self, channel: &str) -> Option<History> {
        if !self.any_history {
            return None;
        }
        self.rules(channel).ok().and_then(|r| r.history)
    }

    /// Whether any namespace keeps history.
    pub fn any_history(&self) -> bool {
        self.any_history
    }

    /// The rules of `channel`'s namespace.
    pub fn rules(&self, channel: &str) -> Result<&Rules, Denial> {
        let ns = match channel.split_once(':') {
            Some((ns, _)) if self.declared => ns,
            _ => return Ok(&self.default),
        };
        self.named
            .get(ns)
            .ok_or_else(|| Denial::UnknownNamespace(ns.to_string()))
    }

    /// May a connection of `user` (`""` = anonymous) subscribe to `channel`?
    /// `channel_token` is true when the subscribe carried a channel token already verified for
    /// this channel and this user. `$` channels always need one.
    pub fn check_subscribe(
        &self,
        channel: &str,
        user: &str,
        channel_token: bool,
    ) -> Result<(), Denial> {
        if self.open && !channel.starts_with('$') {
            return Ok(());
        }
        let rules = self.rules(channel)?;
        if rules.user_limited {
            if let Some((_, users)) = channel.rsplit_once('#') {
                if user.is_empty() || !users.split(',').any(|u| u == user) {
                    return Err(Denial::PermissionDenied(
                        "this channel is limited to the users listed after its '#'",
                    ));
                }
            }
        }
        if rules.subscribe == SubscribeRule::None {
            return Err(Denial::PermissionDenied(
                "nobody may subscribe to channels of this namespace",
            ));
        }
        if channel.starts_with('$') || rules.subscribe == SubscribeRule::Token {
            return if channel_token {
                Ok(())
            } else {
                Err(Denial::PermissionDenied(
                    "this channel needs a channel token (\"token\" in the subscribe)",
                ))
            };
        }
        if channel_token {
            return Ok(());
        }
        match rules.subscribe {
            SubscribeRule::Anonymous => Ok(()),
            SubscribeRule::Authenticated if !user.is_empty() => Ok(()),
            _ => Err(Denial::PermissionDenied(
                "only authenticated users may subscribe to this channel",
            )),
        }
    }

    /// May a connection of `user` publish on `channel` (`subscribed`: it is subscribed to it)?
    /// On private channels (`$…`, `token` namespaces) only subscribers may (their subscription
    /// proved a channel token), and on user-limited channels only the listed users.
    pub fn check_publish(&self, channel: &str, user: &str, subscribed: bool) -> Result<(), Denial> {
        if self.open && !channel.starts_with('$') {
            return Ok(());
        }
        let rules = self.rules(channel)?;
        self.check_private(rules, channel, user, subscribed)?;
        check_access(rules.publish, user, subscribed, "publish")
    }

    /// May a connection of `user` read `channel`'s history with the client `history` command?
    /// The namespace's `history` rule, plus the same private and user-limited restrictions as
    /// publishing.
    pub fn check_history(&self, channel: &str, user: &str, subscribed: bool) -> Result<(), Denial> {
        let rules = self.rules(channel)?;
        self.check_private(rules, channel, user, subscribed)?;
        check_access(rules.history_access, user, subscribed, "history")
    }

    /// The restrictions of private and user-limited channels for actions other than subscribing.
    fn check_private(
        &self,
        rules: &Rules,
        channel: &str,
        user: &str,
        subscribed: bool,
    ) -> Result<(), Denial> {
        if (channel.starts_with('$') || rules.subscribe == SubscribeRule::Token) && !subscribed {
            return Err(Denial::PermissionDenied(
                "only subscribers (with a channel token) may do this on a private channel",
            ));
        }
        if rules.user_limited {
            if let Some((_, users)) = channel.rsplit_once('#') {
                if user.is_empty() || !users.split(',').any(|u| u == user) {
                    return Err(Denial::PermissionDenied(
                        "this channel is limited to the users listed after its '#'",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Apply an [`Access`] rule (`what` names the action in the denial).
pub fn check_access(
    access: Access,
    user: &str,
    subscribed: bool,
    what: &'static str,
) -> Result<(), Denial> {
    let ok = match access {
        Access::None => false,
        Access::Subscribers => subscribed,
        Access::Authenticated => !user.is_empty(),
        Access::Anonymous => true,
    };
    if ok {
        Ok(())
    } else {
        Err(Denial::PermissionDenied(match (access, what) {
            (Access::None, "publish") => "clients may not publish on this channel",
            (Access::Subscribers, "publish") => "only subscribers may publish on this channel",
            (Access::Authenticated, "publish") => {
                "only authenticated users may publish on this channel"
            }
            (Access::None, _) => "this is not allowed on this channel",
            (Access::Subscribers, _) => "only subscribers may do this on this channel",
            _ => "only authenticated users may do this on this channel",
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(default: NamespaceRules, named: &[(&str, NamespaceRules)]) -> Namespaces {
        Namespaces {
            default,
            named: named
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        }
    }

    fn rules(sub: SubscribeRule, publish: Access) -> NamespaceRules {
        NamespaceRules {
            subscribe: Some(sub),
            publish: Some(publish),
            ..NamespaceRules::default()
        }
    }

    #[test]
    fn history_settings() {
        let mut h = rules(SubscribeRule::Anonymous, Access::Anonymous);
        h.history_size = Some(100);
        let mut off = h.clone();
        off.history_size = Some(0);
        let p = Policy::new(
            &ns(NamespaceRules::default(), &[("h", h), ("off", off)]),
            false,
        );
        assert!(p.any_history());
        let got = p.history("h:1").unwrap();
        assert_eq!(got.size, 100);
        assert_eq!(got.ttl, DEFAULT_HISTORY_TTL);
        assert_eq!(p.history("off:1"), None);
        assert_eq!(p.history("nope:1"), None);
        assert_eq!(p.rules("h:1").unwrap().history_access, Access::Subscribers);
        assert!(!Policy::new(&Namespaces::default(), false).any_history());
    }

    #[test]
    fn open_mode_allows_everything_but_dollar_channels() {
        let p = Policy::new(&Namespaces::default(), false);
        assert!(p.is_open());
        assert_eq!(p.check_subscribe("a:b", "", false), Ok(()));
        assert_eq!(p.check_publish("a:b", "", false), Ok(()));
        assert!(p.check_subscribe("$private", "", false).is_err());
        assert_eq!(p.check_subscribe("$private", "", true), Ok(()));
        assert!(
            p.check_publish("$private", "", false).is_err(),
            "not subscribed"
        );
        assert_eq!(p.check_publish("$private", "", true), Ok(()));
    }

    #[test]
    fn auth_defaults() {
        let p = Policy::new(&Namespaces::default(), true);
        assert!(!p.is_open());
        assert_eq!(p.check_subscribe("news", "42", false), Ok(()));
        assert!(p.check_subscribe("news", "", false).is_err(), "anonymous");
        assert!(p.check_publish("news", "42", true).is_err(), "publish none");
        // Without declared namespaces every channel follows the default rules.
        assert_eq!(p.check_subscribe("a:b", "42", false), Ok(()));
    }

    #[test]
    fn declared_namespaces() {
        let p = Policy::new(
            &ns(
                rules(SubscribeRule::Anonymous, Access::None),
                &[
                    (
                        "chat",
                        rules(SubscribeRule::Authenticated, Access::Subscribers),
                    ),
                    ("priv", rules(SubscribeRule::Token, Access::Authenticated)),
                    ("closed", rules(SubscribeRule::None, Access::Anonymous)),
                ],
            ),
            true,
        );
        assert_eq!(
            p.check_subscribe("other:x", "42", false),
            Err(Denial::UnknownNamespace("other".into()))
        );
        assert_eq!(p.check_subscribe("lobby", "", false), Ok(()));
        assert!(p.check_publish("lobby", "42", true).is_err());
        assert!(p.check_subscribe("chat:1", "", false).is_err());
        assert_eq!(p.check_subscribe("chat:1", "7", false), Ok(()));
        assert!(p.check_publish("chat:1", "7", false).is_err());
        assert_eq!(p.check_publish("chat:1", "7", true), Ok(()));
        assert!(p.check_subscribe("priv:1", "7", false).is_err());
        assert_eq!(p.check_subscribe("priv:1", "7", true), Ok(()));
        assert!(p.check_publish("priv:1", "", true).is_err());
        assert!(
            p.check_publish("priv:1", "7", false).is_err(),
            "private: subscribers only"
        );
        assert_eq!(p.check_publish("priv:1", "7", true), Ok(()));
        assert!(p.check_subscribe("closed:1", "7", true).is_err());
        assert_eq!(p.check_publish("closed:1", "", false), Ok(()));
    }

    #[test]
    fn user_limited_channels() {
        let mut dm = rules(SubscribeRule::Authenticated, Access::Subscribers);
        dm.user_limited = true;
        let p = Policy::new(&ns(NamespaceRules::default(), &[("dm", dm)]), true);
        assert_eq!(p.check_subscribe("dm:#17,42", "17", false), Ok(()));
        assert_eq!(p.check_subscribe("dm:#17,42", "42", false), Ok(()));
        assert!(p.check_subscribe("dm:#17,42", "4", false).is_err());
        assert_eq!(p.check_publish("dm:#17,42", "17", true), Ok(()));
        assert!(
            p.check_publish("dm:#17,42", "4", true).is_err(),
            "not listed"
        );
        assert!(
            p.check_history("dm:#17,42", "4", true).is_err(),
            "not listed"
        );
        assert_eq!(p.check_history("dm:#17,42", "42", true), Ok(()));
        assert!(p.check_subscribe("dm:#17,42", "", false).is_err());
        assert!(p.check_subscribe("dm:#17,42", "1", false).is_err());
    }

    #[test]
    fn access_rules() {
        assert!(check_access(Access::None, "1", true, "history").is_err());
        assert!(check_access(Access::Subscribers, "1", false, "history").is_err());
        assert!(check_access(Access::Subscribers, "", true, "history").is_ok());
        assert!(check_access(Access::Authenticated, "", true, "history").is_err());
        assert!(check_access(Access::Anonymous, "", false, "history").is_ok());
        for s in ["none", "subscribers", "authenticated", "anonymous"] {
            assert_eq!(Access::parse(s).unwrap().as_str(), s);
        }
        for s in ["anonymous", "authenticated", "token", "none"] {
            assert_eq!(SubscribeRule::parse(s).unwrap().as_str(), s);
        }
        assert!(Access::parse("token").is_none());
    }
}
