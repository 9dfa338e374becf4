//! The rules file: its YAML form and its validation into [`Rules`].

use super::Rules;
use super::namespaces::{NamespacePathRule, parse_path};
use super::select::{Match, MatchSpec};
use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// Largest rules file accepted.
const MAX_RULES_FILE: u64 = 4 << 20;

/// The rules file as written (camelCase YAML; unknown fields are errors).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RulesFile {
    /// Fields removed from every object.
    #[serde(default)]
    pub strip: StripSpec,
    /// Source namespace -> standby namespace.
    #[serde(default)]
    pub namespaces: BTreeMap<String, String>,
    /// Source storage class -> standby storage class.
    #[serde(default)]
    pub storage_classes: BTreeMap<String, String>,
    /// Image registry rewrites.
    #[serde(default)]
    pub images: Vec<ImageSpec>,
    /// Replica overrides.
    #[serde(default)]
    pub replicas: Vec<ReplicaSpec>,
    /// Labels added or removed.
    #[serde(default)]
    pub labels: Vec<MetadataSpec>,
    /// Annotations added or removed.
    #[serde(default)]
    pub annotations: Vec<MetadataSpec>,
    /// RFC 6902 JSON patches.
    #[serde(default)]
    pub patches: Vec<PatchSpec>,
    /// An inert standby: nothing of the application runs until failover (docs/kubernetes.md).
    #[serde(default)]
    pub inert: bool,
    /// Where objects of some kinds (custom resources) hold namespace names.
    #[serde(default)]
    pub namespace_paths: Vec<NamespacePathSpec>,
}

/// Paths that hold namespace names in the matching objects.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NamespacePathSpec {
    /// Which objects (usually a group and kind).
    #[serde(rename = "match")]
    pub matches: MatchSpec,
    /// JSON pointers; a `*` segment stands for every element of a list or map.
    pub paths: Vec<String>,
}

/// `strip:` section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StripSpec {
    /// Apply the default set of cluster-owned fields (true unless set to false).
    #[serde(default = "yes")]
    pub defaults: bool,
    /// More JSON pointers to remove from every object (absent paths are ignored).
    #[serde(default)]
    pub paths: Vec<String>,
}

impl Default for StripSpec {
    fn default() -> Self {
        StripSpec {
            defaults: true,
            paths: Vec::new(),
        }
    }
}

fn yes() -> bool {
    true
}

/// One image rewrite: images in `from` (a registry, or registry/path prefix) move to `to`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ImageSpec {
    /// Registry or repository prefix, e.g. `registry.shop.example` or `docker.io/library`.
    pub from: String,
    /// Its replacement.
    pub to: String,
    /// Which objects (default: all).
    #[serde(default, rename = "match")]
    pub matches: Option<MatchSpec>,
}

/// One replica override.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ReplicaSpec {
    /// The replica count to set.
    pub replicas: i64,
    /// Which objects (default: every workload).
    #[serde(default, rename = "match")]
    pub matches: Option<MatchSpec>,
}

/// Labels or annotations to add and remove.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MetadataSpec {
    /// Keys set to these values.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    /// Keys removed.
    #[serde(default)]
    pub remove: Vec<String>,
    /// Which objects (default: all).
    #[serde(default, rename = "match")]
    pub matches: Option<MatchSpec>,
}

/// A named RFC 6902 patch.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PatchSpec {
    /// Name used in reports and errors.
    pub name: Option<String>,
    /// Which objects (default: all).
    #[serde(default, rename = "match")]
    pub matches: Option<MatchSpec>,
    /// The operations, as in RFC 6902.
    pub ops: Vec<Value>,
}

/// A validated rule of any kind: where it came from and which objects it applies to.
#[derive(Clone, Debug)]
pub struct Scope {
    /// `patches[2] (lower-memory)`: how errors name the rule.
    pub label: String,
    /// Conditions.
    pub matches: Match,
}

impl Scope {
    fn new(section: &str, i: usize, name: Option<&str>, spec: &Option<MatchSpec>) -> Result<Self> {
        let label = match name {
            Some(n) => format!("{section}[{i}] ({n})"),
            None => format!("{section}[{i}]"),
        };
        let matches = match spec {
            Some(s) => Match::compile(s).with_context(|| format!("rule {label}"))?,
            None => Match::default(),
        };
        Ok(Scope { label, matches })
    }
}

/// A compiled image rewrite.
#[derive(Clone, Debug)]
pub struct ImageRule {
    /// Rule identity and conditions.
    pub scope: Scope,
    /// Prefix matched at a path boundary.
    pub from: String,
    /// Replacement.
    pub to: String,
}

/// A compiled replica override.
#[derive(Clone, Debug)]
pub struct ReplicaRule {
    /// Rule identity and conditions.
    pub scope: Scope,
    /// Replicas to set.
    pub replicas: i64,
}

/// Compiled label or annotation changes.
#[derive(Clone, Debug)]
pub struct MetadataRule {
    /// Rule identity and conditions.
    pub scope: Scope,
    /// Added keys.
    pub add: BTreeMap<String, String>,
    /// Removed keys.
    pub remove: Vec<String>,
}

/// A compiled JSON patch.
#[derive(Clone, Debug)]
pub struct PatchRule {
    /// Rule identity and conditions.
    pub scope: Scope,
    /// The operations.
    pub patch: json_patch::Patch,
}

impl Rules {
    /// Reads and validates a rules file.
    pub fn load(path: &Path) -> Result<Self> {
        let len = std::fs::metadata(path)
            .with_context(|| format!("cannot read rules file {}", path.display()))?
            .len();
        if len > MAX_RULES_FILE {
            bail!(
                "rules file {} is {len} bytes, over the {MAX_RULES_FILE}-byte limit",
                path.display()
            );
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read rules file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("rules file {} is not valid", path.display()))
    }

    /// Parses and validates rules from YAML text.
    pub fn parse(text: &str) -> Result<Self> {
        let file: RulesFile = if text.trim().is_empty() {
            RulesFile::default()
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?
        };
        Self::compile(file)
    }

    /// Validates a parsed rules file.
    pub fn compile(f: RulesFile) -> Result<Self> {
        for (i, p) in f.strip.paths.iter().enumerate() {
            if !p.starts_with('/') {
                bail!("strip.paths[{i}] `{p}` is not a JSON pointer (it must start with /)");
            }
        }
        let images = each(&f.images, |i, s| {
            let scope = Scope::new("images", i, None, &s.matches)?;
            if s.from.is_empty() || s.to.is_empty() {
                bail!("rule {}: `from` and `to` must not be empty", scope.label);
            }
            Ok(ImageRule {
                scope,
                from: s.from.trim_end_matches('/').to_string(),
                to: s.to.trim_end_matches('/').to_string(),
            })
        })?;
        let replicas = each(&f.replicas, |i, s| {
            let scope = Scope::new("replicas", i, None, &s.matches)?;
            if s.replicas < 0 {
                bail!("rule {}: replicas must not be negative", scope.label);
            }
            Ok(ReplicaRule {
                scope,
                replicas: s.replicas,
            })
        })?;
        Ok(Rules {
            strip_defaults: f.strip.defaults,
            strip_paths: f.strip.paths,
            namespaces: f.namespaces,
            storage_classes: f.storage_classes,
            images,
            replicas,
            labels: metadata_rules("labels", &f.labels)?,
            annotations: metadata_rules("annotations", &f.annotations)?,
            patches: each(&f.patches, patch_rule)?,
            inert: f.inert,
            namespace_paths: each(&f.namespace_paths, namespace_path_rule)?,
        })
    }
}

/// Compiles every spec of a section with its index.
fn each<S, R>(specs: &[S], compile: impl Fn(usize, &S) -> Result<R>) -> Result<Vec<R>> {
    specs
        .iter()
        .enumerate()
        .map(|(i, s)| compile(i, s))
        .collect()
}

fn metadata_rules(section: &str, specs: &[MetadataSpec]) -> Result<Vec<MetadataRule>> {
    each(specs, |i, s| {
        Ok(MetadataRule {
            scope: Scope::new(section, i, None, &s.matches)?,
            add: s.add.clone(),
            remove: s.remove.clone(),
        })
    })
}

fn patch_rule(i: usize, s: &PatchSpec) -> Result<PatchRule> {
    let scope = Scope::new("patches", i, s.name.as_deref(), &s.matches)?;
    if s.ops.is_empty() {
        bail!("rule {}: `ops` is empty", scope.label);
    }
    let ops = s
        .ops
        .iter()
        .enumerate()
        .map(|(j, op)| {
            serde_json::from_value::<json_patch::PatchOperation>(op.clone()).with_context(|| {
                format!(
                    "rule {}: ops[{j}] {op} is not a valid RFC 6902 operation",
                    scope.label
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(PatchRule {
        scope,
        patch: json_patch::Patch(ops),
    })
}

fn namespace_path_rule(i: usize, s: &NamespacePathSpec) -> Result<NamespacePathRule> {
    let scope = Scope::new("namespacePaths", i, None, &Some(s.matches.clone()))?;
    if s.paths.is_empty() {
        bail!("rule {}: `paths` is empty", scope.label);
    }
    let paths = s
        .paths
        .iter()
        .map(|p| parse_path(&scope.label, p))
        .collect::<Result<_>>()?;
    Ok(NamespacePathRule { scope, paths })
}
