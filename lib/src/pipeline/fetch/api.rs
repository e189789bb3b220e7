//! The hub's JSON API, read into typed replies: a revision (its commit and
//! file names) and the file tree (sizes and hashes), as huggingface.co
//! serves them.

use serde::Deserialize;

use super::client::{encode_path, is_sha256, join_location, next_link, HubClient};
use super::FetchError;

/// One file of a hub repo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteFile {
    /// Path in the repo.
    pub path: String,
    /// Size in bytes, when the listing gave it.
    pub size: Option<u64>,
    /// sha256 of LFS files.
    pub sha256: Option<String>,
    /// Git blob id.
    pub oid: Option<String>,
}

/// `GET /api/models/{repo}/revision/{rev}`.
#[derive(Debug, Deserialize)]
struct RevisionReply {
    /// The commit.
    sha: Option<String>,
    /// The files of the commit.
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Debug, Deserialize)]
struct Sibling {
    rfilename: String,
}

/// One entry of `GET /api/models/{repo}/tree/{commit}?recursive=1`.
#[derive(Debug, Deserialize)]
struct TreeEntry {
    /// `file` or `directory`.
    #[serde(rename = "type")]
    kind: Option<String>,
    path: Option<String>,
    size: Option<u64>,
    /// The git blob id (of the LFS pointer for LFS files).
    oid: Option<String>,
    lfs: Option<LfsInfo>,
}

/// The LFS part of a tree entry: the content's sha256 and size.
#[derive(Debug, Deserialize)]
struct LfsInfo {
    oid: Option<String>,
    sha256: Option<String>,
    size: Option<u64>,
}

impl TreeEntry {
    fn into_remote(self) -> Option<RemoteFile> {
        if self.kind.as_deref().is_some_and(|t| t != "file") {
            return None;
        }
        let lfs = self.lfs.as_ref();
        Some(RemoteFile {
            size: lfs.and_then(|l| l.size).or(self.size),
            sha256: lfs
                .and_then(|l| l.oid.as_deref().or(l.sha256.as_deref()))
                .map(|s| s.trim_start_matches("sha256:").to_ascii_lowercase())
                .filter(|s| is_sha256(s)),
            path: self.path?,
            oid: self.oid,
        })
    }
}

impl HubClient {
    /// Resolves `revision` to a commit; returns it and the sibling names.
    pub fn revision(
        &self,
        repo: &str,
        revision: &str,
    ) -> Result<(String, Vec<String>), FetchError> {
        let url = format!(
            "{}/api/models/{repo}/revision/{}",
            self.endpoint,
            encode_path(revision).replace('/', "%2F")
        );
        let what = format!("{repo}@{revision}");
        let (v, _): (RevisionReply, _) = self.get_json(&url, &what, repo)?;
        let sha = v
            .sha
            .filter(|s| s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| FetchError::Http {
                what: what.clone(),
                reason: format!("the hub's reply from {url} has no 40-hex `sha`"),
            })?;
        Ok((sha, v.siblings.into_iter().map(|s| s.rfilename).collect()))
    }

    /// Lists the files of `commit` with sizes and hashes (following pages).
    /// Returns `None` when the hub has no tree API (some mirrors).
    pub fn tree(&self, repo: &str, commit: &str) -> Result<Option<Vec<RemoteFile>>, FetchError> {
        let mut url = format!(
            "{}/api/models/{repo}/tree/{commit}?recursive=1&expand=false",
            self.endpoint
        );
        let what = format!("{repo}@{commit} (file list)");
        let mut out = Vec::new();
        for _ in 0..10_000 {
            let (page, link): (Vec<TreeEntry>, _) = match self.get_json(&url, &what, repo) {
                Ok(x) => x,
                Err(FetchError::NotFound { .. }) if out.is_empty() => return Ok(None),
                Err(e) => return Err(e),
            };
            out.extend(page.into_iter().filter_map(TreeEntry::into_remote));
            match link.as_deref().and_then(next_link) {
                Some(next) => url = join_location(&url, &next),
                None => break,
            }
        }
        Ok(Some(out))
    }

    /// The URL of a file's bytes at a commit.
    pub(crate) fn resolve_url(&self, repo: &str, commit: &str, path: &str) -> String {
        format!(
            "{}/{repo}/resolve/{commit}/{}",
            self.endpoint,
            encode_path(path)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_entries_read_lfs_and_plain_files() {
        let page: Vec<TreeEntry> = serde_json::from_str(
            r#"[
              {"type": "directory", "path": "sub", "oid": "x", "size": 0},
              {"type": "file", "path": "config.json", "size": 12,
               "oid": "ce013625030ba8dba906f756967f9e9ca394464a"},
              {"type": "file", "path": "m.safetensors", "size": 134,
               "oid": "1111111111111111111111111111111111111111",
               "lfs": {"oid": "sha256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                       "size": 5000000000, "pointerSize": 134}}
            ]"#,
        )
        .unwrap();
        let files: Vec<RemoteFile> = page
            .into_iter()
            .filter_map(TreeEntry::into_remote)
            .collect();
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].size, Some(12));
        assert_eq!(files[0].sha256, None);
        assert_eq!(files[1].size, Some(5_000_000_000));
        assert_eq!(files[1].sha256.as_deref(), Some(&"a".repeat(64)[..]));
        // A size that is not a u64 is not silently dropped: the reply is refused.
        assert!(serde_json::from_str::<Vec<TreeEntry>>(r#"[{"path": "x", "size": -1}]"#).is_err());
    }
}
