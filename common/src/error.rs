//! Two kinds of error the agents treat apart from the rest: one that a retry cannot fix
//! ([`Permanent`]: a volume path that does not exist, a directory given as a volume, manifests
//! that do not parse), so a cycle fails at once instead of backing off; and a stop asked for by
//! a signal ([`Interrupted`]), which ends the work cleanly and is not a failure of the agent.

/// An error that retrying cannot fix: the user must change the configuration or the files.
/// Wrap with [`permanent`]; test with [`is_permanent`].
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct Permanent(#[from] anyhow::Error);

/// Marks `e` as one a retry cannot fix.
pub fn permanent(e: anyhow::Error) -> anyhow::Error {
    Permanent(e).into()
}

/// True when `e`, or an error it wraps, was marked with [`permanent`].
pub fn is_permanent(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Permanent>())
}

/// Work stopped because the agent was asked to stop (SIGTERM or SIGINT).
#[derive(Debug, thiserror::Error)]
#[error("stopped by a signal")]
pub struct Interrupted;

/// True when `e`, or an error it wraps, is [`Interrupted`].
pub fn is_interrupted(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Interrupted>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn marks_survive_added_context_and_keep_the_message() {
        let e = permanent(anyhow::anyhow!("volume /x does not exist"));
        let e = Err::<(), _>(e).context("scan failed").unwrap_err();
        assert!(is_permanent(&e));
        assert!(!is_interrupted(&e));
        assert_eq!(format!("{e:#}"), "scan failed: volume /x does not exist");
        let i = anyhow::Error::new(Interrupted).context("cut");
        assert!(is_interrupted(&i) && !is_permanent(&i));
        assert!(!is_permanent(&anyhow::anyhow!("network")));
    }
}
