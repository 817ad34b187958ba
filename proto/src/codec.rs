//! Packed little-endian encodings of ids (u64), counts (u32) and rows (f32)
//! carried in `bytes` fields (see the header of `ps.proto`).

use bytes::Bytes;

/// A `bytes` field whose length is not a multiple of its element size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}` has {len} bytes, not a multiple of {elem} ({kind})")]
pub struct CodecError {
    /// Name of the offending field.
    pub field: &'static str,
    /// Its length in bytes.
    pub len: usize,
    /// Element size in bytes.
    pub elem: usize,
    /// Element type name.
    pub kind: &'static str,
}

macro_rules! packed {
    ($enc:ident, $dec:ident, $t:ty, $n:expr, $kind:expr) => {
        #[doc = concat!("Encodes a slice of `", stringify!($t), "` as packed little-endian bytes.")]
        pub fn $enc(values: &[$t]) -> Bytes {
            let mut out = Vec::with_capacity(values.len() * $n);
            for v in values {
                out.extend_from_slice(&v.to_le_bytes());
            }
            Bytes::from(out)
        }

        #[doc = concat!("Decodes packed little-endian `", stringify!($t), "`; `field` names the field in the error.")]
        pub fn $dec(field: &'static str, bytes: &[u8]) -> Result<Vec<$t>, CodecError> {
            if !bytes.len().is_multiple_of($n) {
                return Err(CodecError { field, len: bytes.len(), elem: $n, kind: $kind });
            }
            Ok(bytes
                .chunks_exact($n)
                .map(|c| {
                    let mut a = [0u8; $n];
                    a.copy_from_slice(c);
                    <$t>::from_le_bytes(a)
                })
                .collect())
        }
    };
}

packed!(encode_u64, decode_u64, u64, 8, "u64");
packed!(encode_u32, decode_u32, u32, 4, "u32");
packed!(encode_f32, decode_f32, f32, 4, "f32");

/// Decodes packed f32 into an existing buffer (cleared first), avoiding an allocation per call.
pub fn decode_f32_into(
    field: &'static str,
    bytes: &[u8],
    out: &mut Vec<f32>,
) -> Result<(), CodecError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(CodecError {
            field,
            len: bytes.len(),
            elem: 4,
            kind: "f32",
        });
    }
    out.clear();
    out.reserve(bytes.len() / 4);
    out.extend(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let ids = [0u64, 1, u64::MAX, 42];
        assert_eq!(decode_u64("ids", &encode_u64(&ids)).unwrap(), ids);
        let f = [0.0f32, -1.5, f32::MAX, 3.25];
        assert_eq!(decode_f32("rows", &encode_f32(&f)).unwrap(), f);
        let c = [1u32, 7, u32::MAX];
        assert_eq!(decode_u32("counts", &encode_u32(&c)).unwrap(), c);
        assert_eq!(encode_u64(&[1]).as_ref(), &[1, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn rejects_ragged_lengths() {
        let e = decode_u64("ids", &[0u8; 9]).unwrap_err();
        assert_eq!(e.field, "ids");
        assert!(e.to_string().contains("not a multiple of 8"), "{e}");
        assert!(decode_f32("grads", &[0u8; 6]).is_err());
    }
}
