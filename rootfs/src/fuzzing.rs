//! Entry points for the cargo-fuzz targets in `fuzz/` (not an API): the importer's layer extractor and
//! its reading of image layouts are private to this module tree, and these are their only doors out.
//! Each runs the same code as an import, with the input supplied by the caller.

use std::path::Path;

use super::error::IoContext;
use super::layer::{self, Extractor};
use super::{source, ImageError};

/// Applies `layers` (tar streams, each gzip-compressed or not, detected as an import detects it), in
/// order, into `root` (an existing, empty directory) as the layers of one image, with whiteouts,
/// owners and the root's own entry applied. Returns the bytes of file data unpacked.
pub fn apply_layers(root: &Path, layers: &[&[u8]], max_total: u64) -> Result<u64, ImageError> {
    let mut ex = Extractor::new(root, "fuzz", max_total)?;
    for (i, data) in layers.iter().enumerate() {
        let label = format!("layer {}/{}", i + 1, layers.len());
        let (stream, compressed) = match layer::open_stream(*data) {
            Ok(s) => s,
            Err(layer::OpenError::Io(e)) => return Err(ImageError::io(label, e)),
            Err(layer::OpenError::Unsupported(c)) => {
                return Err(source::unsupported("fuzz", &label, c))
            }
        };
        let known_len = (!compressed).then_some(data.len() as u64);
        ex.apply_layer(stream, known_len, &label)?;
    }
    ex.finish(&mut |_| {})?;
    Ok(ex.bytes())
}

/// Works out what `src` (an OCI layout, a `docker save` archive, a tarball or a directory) is, as an
/// import does, and then, given `staging` (an existing, empty directory), unpacks its layers there with
/// every digest checked. `scratch` is a private directory for a decompressed copy of the archive.
/// Returns the kind of image, its digest and its number of layers.
pub fn plan_and_unpack(
    src: &Path,
    scratch: &Path,
    staging: Option<&Path>,
    max_total: u64,
) -> Result<(&'static str, String, usize), ImageError> {
    let md = std::fs::metadata(src).ctx(|| format!("reading {}", src.display()))?;
    let plan = source::prepare(src, &md, scratch, None, &mut |_| {})?;
    if let Some(staging) = staging {
        source::unpack(&plan, staging, "fuzz", max_total, &mut |_| {})?;
    }
    Ok((plan.kind.name(), plan.digest_hex, plan.layers.len()))
}
