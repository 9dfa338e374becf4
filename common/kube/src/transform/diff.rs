//! Dry-run output: a readable unified diff of what the rules change, object by object.

use super::{Rules, Verdict};
use crate::bundle::{Bundle, ObjectId, to_canonical_yaml};
use anyhow::Result;
use std::fmt::Write;

/// Renders, for every object of `bundle`, what `rules` do to it: a unified diff of the canonical
/// YAML before and after, `unchanged`, or the reason it is left out.
pub fn render_diff(bundle: &Bundle, rules: &Rules) -> Result<String> {
    let mut out = String::new();
    for obj in bundle.objects()? {
        let id = ObjectId::of(&obj)?;
        match rules.transform(&obj)? {
            Verdict::LeaveOut(reason) => writeln!(out, "=== {id}: left out ({reason})")?,
            Verdict::Apply(after) => {
                let after_id = ObjectId::of(&after)?;
                let (a, b) = (to_canonical_yaml(&obj)?, to_canonical_yaml(&after)?);
                if a == b {
                    writeln!(out, "=== {id}: unchanged")?;
                    continue;
                }
                let title = if after_id == id {
                    format!("=== {id}")
                } else {
                    format!("=== {id} -> {after_id}")
                };
                writeln!(out, "{title}")?;
                let diff = similar::TextDiff::from_lines(&a, &b);
                write!(
                    out,
                    "{}",
                    diff.unified_diff()
                        .context_radius(2)
                        .header("captured", "standby")
                )?;
            }
        }
    }
    Ok(out)
}
