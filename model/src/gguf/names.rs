//! llama.cpp tensor names to Hugging Face names, and the undoing of llama.cpp's q/k row permutation.

/// The Hugging Face name of a llama.cpp tensor, or None for a name outside the LLaMA set.
pub fn gguf_to_hf(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Which heads count applies when undoing the permutation of a llama.cpp tensor.
pub enum Permuted {
    /// `attn_q`: permuted with the attention head count.
    Query,
    /// `attn_k`: permuted with the key/value head count.
    Key,
}

pub fn permuted(gguf_name: &str) -> Option<Permuted> {
    if gguf_name.ends_with(".attn_q.weight") {
        Some(Permuted::Query)
    } else if gguf_name.ends_with(".attn_k.weight") {
        Some(Permuted::Key)
    } else {
        None
    }
}

/// Undoes llama.cpp's converter, which for a `[out, in]` projection with `n_head` heads of `head_dim`
/// rows did `w.reshape(n_head, 2, head_dim / 2, in).swapaxes(1, 2).reshape(out, in)`: row
/// `h·hd + 2i + j` of the GGUF tensor is row `h·hd + j·hd/2 + i` of the Hugging Face one.
/// `w` is row-major `[out, in]` with `out = n_head · head_dim`; errors when the sizes disagree.
pub fn unpermute_rows<T: Copy>(
    w: &[T],
    out: usize,
    n_head: usize,
    cols: usize,
) -> Result<Vec<T>, String> {
    if n_head == 0 || out % n_head != 0 || (out / n_head) % 2 != 0 || w.len() != out * cols {
        return Err(format!(
            "cannot undo the q/k permutation: {out} rows do not split into {n_head} heads of even size"
        ));
    }
    let hd = out / n_head;
    let half = hd / 2;
    let mut res = Vec::with_capacity(w.len());
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                let src = (h * hd + 2 * i + j) * cols;
                res.extend_from_slice(&w[src..src + cols]);
            }
        }
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's forward permutation, written the numpy way.
    fn permute(w: &[usize], n_head: usize, hd: usize, cols: usize) -> Vec<usize> {
        let mut out = vec![0; w.len()];
        for h in 0..n_head {
            for j in 0..2 {
                for i in 0..hd / 2 {
                    let hf = h * hd + j * hd / 2 + i;
                    let gg = h * hd + i * 2 + j;
                    out[gg * cols..(gg + 1) * cols].copy_from_slice(&w[hf * cols..(hf + 1) * cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_llama_cpp() {
        let (n_head, hd, cols) = (3, 8, 5);
        let w: Vec<usize> = (0..n_head * hd * cols).collect();
        let p = permute(&w, n_head, hd, cols);
        assert_ne!(p, w);
        assert_eq!(unpermute_rows(&p, n_head * hd, n_head, cols).unwrap(), w);
        assert!(unpermute_rows(&p, n_head * hd, 5, cols).is_err());
    }

    #[test]
    fn names() {
        assert_eq!(
            gguf_to_hf("blk.12.attn_output.weight").as_deref(),
            Some("model.layers.12.self_attn.o_proj.weight")
        );
        assert_eq!(
            gguf_to_hf("blk.0.ffn_norm.weight").as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        assert_eq!(
            gguf_to_hf("output.weight").as_deref(),
            Some("lm_head.weight")
        );
        assert_eq!(gguf_to_hf("blk.x.attn_q.weight"), None);
        assert_eq!(gguf_to_hf("rope_freqs.weight"), None);
    }
}
