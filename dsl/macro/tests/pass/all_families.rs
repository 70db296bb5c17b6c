use mixc_macro::mixer;

fn main() {
    let conv: mixc_dsl::MixerSpec = mixer! {
        mixer hyena {
            heads = 8;
            head_dim = 64;
            input f: f32[heads, seq];
            score = filter(f);
            mask = causal;
            norm = none;
        }
    };
    assert_eq!(conv.family, mixc_dsl::Family::Convolution);
    let doc = mixer! {
        mixer docs {
            heads = 16;
            kv_heads = 4;
            head_dim = 128;
            input doc: i32[batch, seq];
            mask = causal && segment(doc) && block_sparse(block = 64, local = 2, global = 1);
        }
    };
    assert_eq!(doc.family, mixc_dsl::Family::Softmax);
}
