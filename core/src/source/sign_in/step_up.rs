//! Step-up (SEP-2350): an upstream answered 403 `insufficient_scope` to a signed-in credential, so
//! a person must consent to more. Refreshing cannot widen a grant (RFC 6749 §6), so the credential
//! records a new authorization request for the union of the granted and the challenged scopes
//! ([`StepUp`], stored beside the sign-in under [`STEP_UP_KEY`]); the next `login` asks for it.
//! At most [`MAX_ATTEMPTS`] step-ups per scope set: an upstream that keeps refusing what its
//! authorization server grants is not asked about again and again.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{OAuth2Source, SecretKeyRef, SecretString};

/// The sign-in Secret's key holding the step-up state ([`StepUp`], JSON); absent or empty when the
/// credential never needed more consent.
pub const STEP_UP_KEY: &str = "step-up";
/// Step-ups per credential and scope set: the conformance suite's limit (`auth/scope-retry-limit`
/// warns past 3).
pub const MAX_ATTEMPTS: u32 = 3;

/// Where the step-up state of a sign-in credential is.
pub fn step_up_ref(credential: &str, o: &OAuth2Source) -> SecretKeyRef {
    SecretKeyRef {
        name: super::secret_name(credential, o),
        key: STEP_UP_KEY.into(),
    }
}

/// What a credential's step-ups so far were.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StepUp {
    /// The scopes the next sign-in asks for (space-separated), the last union asked for.
    pub scope: String,
    /// Whether a person still has to sign in for `scope` (cleared by a sign-in that asked for it).
    pub pending: bool,
    /// Step-ups asked for, per scope set (its scopes sorted, space-separated).
    #[serde(default)]
    pub attempts: BTreeMap<String, u32>,
}

/// What to do about an `insufficient_scope` rejection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Ask a person to sign in for `scope`: store this state.
    Ask(StepUp),
    /// A sign-in for this scope set was asked for already and has not happened yet.
    Waiting(StepUp),
    /// [`MAX_ATTEMPTS`] sign-ins for this scope set did not satisfy the upstream: asked no more.
    GiveUp(StepUp),
}

/// The union of `granted` and `challenged` (space-separated scope lists): the granted ones first,
/// in their order, then the new ones, each once.
pub fn union(granted: Option<&str>, challenged: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for s in granted
        .unwrap_or("")
        .split_whitespace()
        .chain(challenged.split_whitespace())
    {
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out.join(" ")
}

/// A scope list as a set: sorted, each once.
fn set_key(scope: &str) -> String {
    let mut v: Vec<&str> = scope.split_whitespace().collect();
    v.sort_unstable();
    v.dedup();
    v.join(" ")
}

/// Decides on a 403 `insufficient_scope` whose challenge names `challenged` (empty when it names
/// none), for a credential granted `granted`, given the stored `previous` state. Every
/// authorization request for a scope set counts, the sign-in that obtained the grant included:
/// when the union is what was granted and no step-up for it was counted yet, that sign-in was the
/// first attempt.
pub fn decide(previous: Option<&StepUp>, granted: Option<&str>, challenged: &str) -> Decision {
    let scope = union(granted, challenged);
    let key = set_key(&scope);
    let mut state = previous.cloned().unwrap_or_default();
    if state.pending && set_key(&state.scope) == key {
        return Decision::Waiting(state);
    }
    let signed_in_for_it = u32::from(set_key(granted.unwrap_or("")) == key);
    let attempts = state.attempts.get(&key).copied().unwrap_or(signed_in_for_it);
    if attempts >= MAX_ATTEMPTS {
        state.pending = false;
        return Decision::GiveUp(state);
    }
    state.attempts.insert(key, attempts + 1);
    state.scope = scope;
    state.pending = true;
    Decision::Ask(state)
}

impl StepUp {
    /// Reads the stored JSON (`None` when empty); the message names the key, never its content.
    pub fn parse(text: &str) -> Result<Option<Self>, String> {
        if text.trim().is_empty() {
            return Ok(None);
        }
        serde_json::from_str(text).map(Some).map_err(|e| {
            format!(
                "the sign-in's {STEP_UP_KEY:?} is not the JSON a step-up writes (line {}, column {}); delete it \
                 (the next sign-in asks for the default scopes)",
                e.line(),
                e.column()
            )
        })
    }

    /// The JSON to store.
    pub fn to_json(&self) -> SecretString {
        SecretString::new(serde_json::to_string(self).expect("a step-up serializes"))
    }

    /// The state after a sign-in that asked for `self.scope`: nothing pending, the counts kept.
    pub fn signed_in(mut self) -> Self {
        self.pending = false;
        self
    }

    /// How many step-ups were asked for the scope set `scope`.
    pub fn attempts_for(&self, scope: &str) -> u32 {
        self.attempts.get(&set_key(scope)).copied().unwrap_or(0)
    }

    /// What the credential says while a sign-in is pending, naming the command (`command`) to run.
    pub fn message(&self, command: &str) -> String {
        format!(
            "more consent needed: the upstream answered 403 insufficient_scope; run {command} to sign in again for \
             the scopes {:?} (sign-in {} of at most {MAX_ATTEMPTS} for them)",
            self.scope,
            self.attempts_for(&self.scope)
        )
    }

    /// What the credential says after [`Decision::GiveUp`].
    pub fn gave_up_message(&self, challenged: &str) -> String {
        format!(
            "the upstream still answers 403 insufficient_scope (it asks for {challenged:?}) after {MAX_ATTEMPTS} \
             sign-ins for the scopes {:?}: no further sign-in is asked for. Check that the authorization server \
             can grant these scopes to this client (oauth2.scopes), then sign in again by hand",
            self.scope
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_union_keeps_the_granted_scopes_first_and_each_scope_once() {
        assert_eq!(
            union(Some("mcp:basic"), "mcp:basic mcp:write"),
            "mcp:basic mcp:write"
        );
        assert_eq!(union(Some("a offline_access"), "c a b"), "a offline_access c b");
        assert_eq!(union(None, "  x  y x "), "x y");
        assert_eq!(union(Some("a b"), ""), "a b");
    }

    #[test]
    fn a_rejection_asks_for_the_union_once_until_someone_signs_in() {
        let first = decide(None, Some("mcp:basic"), "mcp:basic mcp:write");
        let Decision::Ask(state) = first else {
            panic!("{first:?}")
        };
        assert_eq!(state.scope, "mcp:basic mcp:write");
        assert!(state.pending);
        assert_eq!(state.attempts_for("mcp:write mcp:basic"), 1);
        // More 403s before the sign-in are the same step-up, not new attempts.
        let again = decide(Some(&state), Some("mcp:basic"), "mcp:write mcp:basic");
        assert_eq!(again, Decision::Waiting(state.clone()));
        let round = StepUp::parse(state.to_json().expose()).unwrap().unwrap();
        assert_eq!(round, state);
        assert_eq!(StepUp::parse("").unwrap(), None);
        assert!(StepUp::parse("{").unwrap_err().contains("step-up"));
    }

    #[test]
    fn the_sign_in_that_was_granted_the_scopes_counts_as_the_first_attempt() {
        // The upstream refuses the very scopes the sign-in got: two more sign-ins, then no more.
        let Decision::Ask(first) = decide(None, Some("mcp:admin"), "mcp:admin") else {
            panic!()
        };
        assert_eq!(first.attempts_for("mcp:admin"), 2);
        let Decision::Ask(second) = decide(Some(&first.signed_in()), Some("mcp:admin"), "mcp:admin") else {
            panic!()
        };
        assert_eq!(second.attempts_for("mcp:admin"), 3);
        let last = decide(Some(&second.signed_in()), Some("mcp:admin"), "mcp:admin");
        assert!(matches!(last, Decision::GiveUp(_)), "{last:?}");
    }

    #[test]
    fn at_most_three_step_ups_per_scope_set() {
        let mut state: Option<StepUp> = None;
        for attempt in 1..=MAX_ATTEMPTS {
            match decide(state.as_ref(), Some("a"), "a b") {
                Decision::Ask(s) => {
                    assert_eq!(s.attempts_for("a b"), attempt);
                    // The person signs in for the union; the upstream still refuses.
                    state = Some(s.signed_in());
                }
                other => panic!("attempt {attempt}: {other:?}"),
            }
        }
        let gave_up = decide(state.as_ref(), Some("a b"), "b a");
        let Decision::GiveUp(s) = gave_up else {
            panic!("{gave_up:?}")
        };
        assert!(!s.pending);
        assert!(s.gave_up_message("a b").contains("after 3 sign-ins"));
        // Another scope set has its own count.
        let other = decide(Some(&s), Some("a b"), "c");
        let Decision::Ask(o) = other else {
            panic!("{other:?}")
        };
        assert_eq!((o.scope.as_str(), o.attempts_for("a b c")), ("a b c", 1));
        assert!(o.message("login x").contains("run login x"));
    }
}
