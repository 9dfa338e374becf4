//! Application manifests: the bundle a recovery point stores, captured from a directory of YAML
//! (standalone mode) or from a cluster ([`crate::capture`]), and the identity of the
//! Kubernetes objects in it. Failover changes them with [`crate::transform::Rules`].

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// Manifest files by relative path, in a canonical order: two captures of the same directory give
/// identical bytes and digests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    /// Relative path -> file content.
    pub files: BTreeMap<String, Vec<u8>>,
}

/// Largest manifest file accepted.
const MAX_MANIFEST_FILE: u64 = 16 << 20;

impl Bundle {
    /// Reads every `.yaml`, `.yml` and `.json` file under `dir` (recursively) and checks that each
    /// document is a Kubernetes object (a mapping with apiVersion and kind).
    pub fn capture(dir: &Path) -> Result<Self> {
        let mut files = BTreeMap::new();
        collect(dir, dir, &mut files)?;
        for (path, data) in &files {
            parse_documents(data).with_context(|| {
                format!(
                    "manifest {}/{path} is not valid: fix or remove it",
                    dir.display()
                )
            })?;
        }
        Ok(Bundle { files })
    }

    /// Canonical encoding stored in a recovery point.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("a bundle always serialises")
    }

    /// Decodes a stored bundle. No bytes at all is the empty bundle: a cut that protects volumes
    /// only ([`understudy_common::cut::NoManifests`]) stores nothing.
    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.is_empty() {
            return Ok(Bundle::default());
        }
        postcard::from_bytes(b).context("manifest bundle is unreadable")
    }

    /// BLAKE3 of the canonical encoding, hex: equal bundles have equal digests.
    pub fn digest(&self) -> String {
        blake3::hash(&self.encode()).to_hex().to_string()
    }

    /// One canonical JSON file per object, at `<namespace or _cluster>/<Kind.group>/<name>.json`.
    /// Two captures of the same objects give identical bundles, whatever order they came in.
    /// JSON, not YAML: every Kubernetes tool reads it back to the same object, where YAML 1.1
    /// readers (kubectl's among them) take unquoted `yes`, `on`, `1_000` or `12:30` for booleans
    /// and numbers.
    pub fn from_objects(objects: &[Value]) -> Result<Self> {
        let mut files = BTreeMap::new();
        for obj in objects {
            let id = ObjectId::of(obj)?;
            if files
                .insert(id.file_path(), to_canonical_json(obj).into_bytes())
                .is_some()
            {
                bail!("{id} appears twice in the bundle");
            }
        }
        Ok(Bundle { files })
    }

    /// Every object of every file, in path order.
    pub fn objects(&self) -> Result<Vec<Value>> {
        let mut out = Vec::new();
        for (path, data) in &self.files {
            out.extend(
                parse_documents(data)
                    .with_context(|| format!("manifest {path} in the bundle is not valid"))?,
            );
        }
        Ok(out)
    }

    /// Writes the files under `dir` (created if missing); the inverse of [`Bundle::capture`].
    pub fn write_to(&self, dir: &Path) -> Result<()> {
        for (path, data) in &self.files {
            let p = dir.join(path);
            if let Some(parent) = p.parent() {
                understudy_common::files::private_dir(parent)?;
            }
            understudy_common::files::write_private(&p, data)?;
        }
        Ok(())
    }

    /// Reads a bundle from a directory of YAML files or from one (multi-document) YAML file.
    pub fn read(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Self::capture(path);
        }
        let data = std::fs::read(path).with_context(|| {
            format!(
                "cannot read bundle {}: give a YAML file or a directory",
                path.display()
            )
        })?;
        parse_documents(&data)
            .with_context(|| format!("bundle {} is not valid", path.display()))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Bundle {
            files: [(name, data)].into(),
        })
    }
}

/// Canonical JSON of an object: keys sorted (serde_json's map is ordered), two-space indent, a
/// final newline.
pub fn to_canonical_json(obj: &Value) -> String {
    let mut s = serde_json::to_string_pretty(obj).unwrap_or_default();
    s.push('\n');
    s
}

/// Canonical YAML of an object, for people to read (diffs): keys sorted, two-space indent.
pub fn to_canonical_yaml(obj: &Value) -> Result<String> {
    serde_yaml_ng::to_string(obj).context("cannot render an object as YAML")
}

/// Identity of a Kubernetes object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectId {
    /// API group; empty for the core group.
    pub group: String,
    /// Kind.
    pub kind: String,
    /// Namespace; empty for cluster-scoped objects.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ObjectId {
    /// Reads the identity of an object (it needs apiVersion, kind and metadata.name).
    pub fn of(obj: &Value) -> Result<Self> {
        let s = |p: &str| obj.pointer(p).and_then(Value::as_str);
        let (Some(api_version), Some(kind)) = (s("/apiVersion"), s("/kind")) else {
            bail!("object has no apiVersion or kind");
        };
        let Some(name) = s("/metadata/name") else {
            bail!("{kind} object has no metadata.name");
        };
        let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
        Ok(ObjectId {
            group: group.to_string(),
            kind: kind.to_string(),
            namespace: s("/metadata/namespace").unwrap_or("").to_string(),
            name: name.to_string(),
        })
    }

    /// `Kind.group` (`Kind` for the core group).
    pub fn kind_group(&self) -> String {
        if self.group.is_empty() {
            self.kind.clone()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }

    fn file_path(&self) -> String {
        let ns = if self.namespace.is_empty() {
            "_cluster"
        } else {
            &self.namespace
        };
        format!("{ns}/{}/{}.json", self.kind_group(), self.name)
    }
}

impl std::fmt::Display for ObjectId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind_group(), self.name)
        } else {
            write!(f, "{} {}/{}", self.kind_group(), self.namespace, self.name)
        }
    }
}

fn collect(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) -> Result<()> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| {
            format!(
                "cannot read manifest directory {}: check that --manifests names an existing directory this agent may read",
                dir.display()
            )
        })?;
    for e in entries {
        let e = e?;
        let path = e.path();
        let ft = e.file_type()?;
        if ft.is_dir() {
            collect(root, &path, out)?;
            continue;
        }
        let ext = path.extension().and_then(|x| x.to_str()).unwrap_or("");
        if !ft.is_file() || !matches!(ext, "yaml" | "yml" | "json") {
            continue;
        }
        let len = e.metadata()?.len();
        if len > MAX_MANIFEST_FILE {
            bail!(
                "manifest {} is {len} bytes, over the {MAX_MANIFEST_FILE}-byte limit",
                path.display()
            );
        }
        let rel = path
            .strip_prefix(root)
            .expect("under root")
            .to_string_lossy()
            .into_owned();
        out.insert(
            rel,
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?,
        );
    }
    Ok(())
}

/// Parses a YAML (or JSON) file into its Kubernetes objects; empty documents are skipped.
pub fn parse_documents(data: &[u8]) -> Result<Vec<Value>> {
    let text = std::str::from_utf8(data).context("not UTF-8")?;
    let mut out = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let v = Value::deserialize(doc)
            .with_context(|| format!("document {} is not valid YAML", i + 1))?;
        if v.is_null() {
            continue;
        }
        let ok = v.get("apiVersion").is_some_and(Value::is_string)
            && v.get("kind").is_some_and(Value::is_string);
        if !ok {
            bail!(
                "document {} is not a Kubernetes object (it needs string fields apiVersion and kind)",
                i + 1
            );
        }
        out.push(v);
    }
    Ok(out)
}

/// Parses `from=to` pairs given on a command line.
pub fn parse_map(pairs: &[String], what: &str) -> Result<BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|p| {
            let (a, b) = p
                .split_once('=')
                .with_context(|| format!("{what} map entry `{p}` is not FROM=TO"))?;
            Ok((a.to_string(), b.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_cut_without_manifests_reads_back_as_the_empty_bundle() {
        use understudy_common::cut::{ManifestSource, NoManifests};
        let stored = NoManifests.capture().unwrap().encoded;
        assert_eq!(Bundle::decode(&stored).unwrap(), Bundle::default());
        let empty = Bundle::default().captured().encoded;
        assert_eq!(Bundle::decode(&empty).unwrap(), Bundle::default());
    }

    #[test]
    fn bundles_are_canonical_whatever_the_order() {
        let a = json!({"kind":"ConfigMap","apiVersion":"v1","metadata":{"namespace":"shop","name":"c"},"data":{"z":"1","a":"2"}});
        let b = json!({"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"web","namespace":"shop"}});
        let one = Bundle::from_objects(&[a.clone(), b.clone()]).unwrap();
        let two = Bundle::from_objects(&[b, a]).unwrap();
        assert_eq!(one, two);
        assert_eq!(one.digest(), two.digest());
        let text = String::from_utf8(one.files["shop/ConfigMap/c.json"].clone()).unwrap();
        assert!(
            text.starts_with(
                "{\n  \"apiVersion\": \"v1\",\n  \"data\": {\n    \"a\": \"2\",\n    \"z\": \"1\"\n"
            ),
            "{text}"
        );
        assert!(one.files.contains_key("shop/Deployment.apps/web.json"));
        let dup = Bundle::from_objects(&vec![
            json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"}});
            2
        ]);
        assert!(format!("{:#}", dup.unwrap_err()).contains("ConfigMap c appears twice"));
    }

    #[test]
    fn strings_that_yaml_1_1_reads_as_other_types_stay_strings() {
        let odd = [
            "yes", "on", "off", "y", "1_000", "12:30", "0755", "0x1f", "1e3", "null", "~", ".inf",
        ];
        let data: serde_json::Map<String, Value> = odd
            .iter()
            .map(|s| (s.to_string(), Value::from(*s)))
            .collect();
        let obj =
            json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"odd"},"data":data});
        let b = Bundle::from_objects(std::slice::from_ref(&obj)).unwrap();
        let text = &b.files["_cluster/ConfigMap/odd.json"];
        // JSON: every string is quoted, so no reader can take it for another type.
        let back: Value = serde_json::from_slice(text).unwrap();
        assert_eq!(back, obj);
        for s in odd {
            let quoted = format!("\"{s}\": \"{s}\"");
            assert!(String::from_utf8_lossy(text).contains(&quoted), "{s}");
        }
        assert_eq!(b.objects().unwrap(), vec![obj]);
    }

    #[test]
    fn bad_documents_are_named() {
        let e = parse_documents(b"apiVersion: v1\nkind: ConfigMap\n---\nfoo: [\n").unwrap_err();
        assert!(format!("{e:#}").contains("document 2"), "{e:#}");
        let e = parse_documents(b"just: a map\n").unwrap_err();
        assert!(format!("{e:#}").contains("apiVersion"));
    }
}
