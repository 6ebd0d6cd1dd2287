//! The zip container of `torch.save`: stored (uncompressed) entries only, no zip64, each entry's
//! data aligned to 64 bytes by an `FB` padding field in its local header, as PyTorch's writer
//! does. [`read_entries`] goes through the central directory and checks every entry's CRC-32;
//! [`write_stored`] writes such an archive byte for byte the same for the same records.

/// Where each entry's data starts: a multiple of this (PyTorch's `kFieldAlignment`).
pub const ALIGNMENT: usize = 64;

const LOCAL_SIG: u32 = 0x0403_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const EOCD_SIG: u32 = 0x0605_4b50;
const LOCAL_HEADER_LEN: usize = 30;
const CENTRAL_HEADER_LEN: usize = 46;
const EOCD_LEN: usize = 22;
/// DOS date 1980-01-01, time 00:00: a fixed timestamp keeps the output reproducible.
const DOS_DATE: u16 = 0x21;
const DOS_TIME: u16 = 0;

/// One stored entry: its name and its bytes (borrowed from the archive).
#[derive(Debug)]
pub struct Entry<'a> {
    pub name: String,
    pub data: &'a [u8],
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The entries of the zip archive `bytes`, in central-directory order. Refuses, with a message
/// (the caller adds the file name): no end-of-central-directory record, zip64, compressed or
/// encrypted entries, records that point outside the file, and CRC mismatches.
pub fn read_entries(bytes: &[u8]) -> Result<Vec<Entry<'_>>, String> {
    let not_zip = || "not a zip archive (torch.save's format) or truncated".to_string();
    if bytes.len() < EOCD_LEN {
        return Err(not_zip());
    }
    // The end record sits in the last 22 + 65535 (comment) bytes.
    let lowest = bytes.len().saturating_sub(EOCD_LEN + u16::MAX as usize);
    let eocd = (lowest..=bytes.len() - EOCD_LEN)
        .rev()
        .find(|&i| u32_at(bytes, i) == Some(EOCD_SIG))
        .ok_or_else(not_zip)?;
    let count = u16_at(bytes, eocd + 10).ok_or_else(not_zip)? as usize;
    let cd_size = u32_at(bytes, eocd + 12).ok_or_else(not_zip)?;
    let cd_offset = u32_at(bytes, eocd + 16).ok_or_else(not_zip)?;
    if count == 0xFFFF || cd_size == u32::MAX || cd_offset == u32::MAX {
        return Err("zip64 archive (over 4 GiB or 65535 entries) is not supported".into());
    }
    let mut at = cd_offset as usize;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let bad = |what: &str| format!("zip central directory entry {i}: {what}");
        if u32_at(bytes, at) != Some(CENTRAL_SIG) {
            return Err(bad("bad signature (truncated or corrupt archive)"));
        }
        let field16 = |off: usize| u16_at(bytes, at + off).ok_or_else(|| bad("truncated"));
        let field32 = |off: usize| u32_at(bytes, at + off).ok_or_else(|| bad("truncated"));
        let flags = field16(8)?;
        let method = field16(10)?;
        let crc = field32(16)?;
        let comp_size = field32(20)?;
        let size = field32(24)?;
        let name_len = field16(28)? as usize;
        let extra_len = field16(30)? as usize;
        let comment_len = field16(32)? as usize;
        let local = field32(42)? as usize;
        let name_bytes = bytes
            .get(at + CENTRAL_HEADER_LEN..at + CENTRAL_HEADER_LEN + name_len)
            .ok_or_else(|| bad("name outside the file"))?;
        let name = String::from_utf8_lossy(name_bytes).into_owned();
        let bad = |what: &str| format!("zip entry {name}: {what}");
        if flags & 1 != 0 {
            return Err(bad("encrypted"));
        }
        if method != 0 {
            return Err(bad(&format!(
                "compressed (method {method}); torch.save stores entries uncompressed"
            )));
        }
        if comp_size != size || size == u32::MAX || local == u32::MAX as usize {
            return Err(bad("zip64 or inconsistent sizes (not supported)"));
        }
        if u32_at(bytes, local) != Some(LOCAL_SIG) {
            return Err(bad("local header missing (truncated or corrupt archive)"));
        }
        let local_name = u16_at(bytes, local + 26).ok_or_else(|| bad("truncated"))? as usize;
        let local_extra = u16_at(bytes, local + 28).ok_or_else(|| bad("truncated"))? as usize;
        let start = local + LOCAL_HEADER_LEN + local_name + local_extra;
        let data = bytes
            .get(start..start + size as usize)
            .ok_or_else(|| bad("data runs past the end of the file (truncated?)"))?;
        if crc32fast::hash(data) != crc {
            return Err(bad("CRC-32 mismatch (corrupt data)"));
        }
        out.push(Entry { name, data });
        at += CENTRAL_HEADER_LEN + name_len + extra_len + comment_len;
    }
    Ok(out)
}

/// A zip archive of `records` (name, bytes), stored, each record's data 64-byte aligned through
/// an `FB` extra field of `Z`s in its local header, as PyTorch's writer pads them. Fails when
/// the archive would need zip64 (over 4 GiB, or 65535 records).
pub fn write_stored(records: &[(String, Vec<u8>)]) -> Result<Vec<u8>, String> {
    let too_big = || "the archive would exceed 4 GiB (zip64 is not written)".to_string();
    if records.len() >= 0xFFFF {
        return Err(format!(
            "{} records: too many for a zip archive without zip64",
            records.len()
        ));
    }
    let mut out: Vec<u8> = Vec::new();
    let mut central: Vec<u8> = Vec::new();
    for (name, data) in records {
        let offset = u32::try_from(out.len()).map_err(|_| too_big())?;
        let size = u32::try_from(data.len()).map_err(|_| too_big())?;
        let name_len = u16::try_from(name.len()).map_err(|_| format!("{name}: name too long"))?;
        let crc = crc32fast::hash(data);
        // Padding so that the data starts on a multiple of ALIGNMENT, after a 4-byte field header.
        let start = out.len() + LOCAL_HEADER_LEN + name.len() + 4;
        let pad = (ALIGNMENT - start % ALIGNMENT) % ALIGNMENT;
        let mut extra = vec![b'F', b'B'];
        extra.extend_from_slice(&(pad as u16).to_le_bytes());
        extra.extend(std::iter::repeat_n(b'Z', pad));

        let header = |sig: u32, central: bool| -> Vec<u8> {
            let mut h = Vec::with_capacity(CENTRAL_HEADER_LEN);
            h.extend_from_slice(&sig.to_le_bytes());
            if central {
                h.extend_from_slice(&20u16.to_le_bytes()); // version made by
            }
            h.extend_from_slice(&20u16.to_le_bytes()); // version needed
            h.extend_from_slice(&0u16.to_le_bytes()); // flags
            h.extend_from_slice(&0u16.to_le_bytes()); // method: stored
            h.extend_from_slice(&DOS_TIME.to_le_bytes());
            h.extend_from_slice(&DOS_DATE.to_le_bytes());
            h.extend_from_slice(&crc.to_le_bytes());
            h.extend_from_slice(&size.to_le_bytes());
            h.extend_from_slice(&size.to_le_bytes());
            h.extend_from_slice(&name_len.to_le_bytes());
            h
        };
        out.extend(header(LOCAL_SIG, false));
        out.extend_from_slice(&(extra.len() as u16).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&extra);
        debug_assert_eq!(out.len() % ALIGNMENT, 0);
        out.extend_from_slice(data);

        central.extend(header(CENTRAL_SIG, true));
        central.extend_from_slice(&0u16.to_le_bytes()); // extra length
        central.extend_from_slice(&0u16.to_le_bytes()); // comment length
        central.extend_from_slice(&0u16.to_le_bytes()); // disk number
        central.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
        central.extend_from_slice(&0u32.to_le_bytes()); // external attributes
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
    }
    let cd_offset = u32::try_from(out.len()).map_err(|_| too_big())?;
    let cd_size = central.len() as u32;
    out.extend(central);
    u32::try_from(out.len() + EOCD_LEN).map_err(|_| too_big())?;
    let n = records.len() as u16;
    out.extend_from_slice(&EOCD_SIG.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes()); // this disk
    out.extend_from_slice(&0u16.to_le_bytes()); // disk of the central directory
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&cd_size.to_le_bytes());
    out.extend_from_slice(&cd_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes()); // comment length
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records() -> Vec<(String, Vec<u8>)> {
        vec![
            ("archive/data.pkl".into(), b"\x80\x02}q\x00.".to_vec()),
            ("archive/data/0".into(), (0..=255u8).collect()),
            ("archive/version".into(), b"3\n".to_vec()),
        ]
    }

    #[test]
    fn round_trips_with_aligned_data() {
        let z = write_stored(&records()).unwrap();
        let entries = read_entries(&z).unwrap();
        assert_eq!(entries.len(), 3);
        for ((name, data), e) in records().iter().zip(&entries) {
            assert_eq!((&e.name, e.data), (name, &data[..]));
            let offset = e.data.as_ptr() as usize - z.as_ptr() as usize;
            assert_eq!(offset % ALIGNMENT, 0, "{name} at {offset}");
        }
    }

    #[test]
    fn refuses_truncated_corrupt_and_compressed_archives() {
        let z = write_stored(&records()).unwrap();
        assert!(read_entries(&z[..z.len() / 2])
            .unwrap_err()
            .contains("not a zip"));
        assert!(read_entries(b"PK\x03\x04 hello").is_err());
        let mut flipped = z.clone();
        flipped[64 * 2 + 5] ^= 1; // a byte of data/0
        let e = read_entries(&flipped).unwrap_err();
        assert!(e.contains("CRC-32 mismatch"), "{e}");
        // Method 8 (deflate) in the first central entry.
        let cd = z
            .windows(4)
            .position(|w| w == CENTRAL_SIG.to_le_bytes())
            .unwrap();
        let mut deflated = z.clone();
        deflated[cd + 10] = 8;
        let e = read_entries(&deflated).unwrap_err();
        assert!(e.contains("compressed (method 8)"), "{e}");
    }
}
