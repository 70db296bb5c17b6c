use mixc_macro::mixer;

fn main() {
    let _spec = mixer! {
        mixer bad {
            heads = 8;
            kv_heads = 3;
            head_dim = 64;
            dtype = fp16;
            bias = tahn(i - j);
        }
    };
}
