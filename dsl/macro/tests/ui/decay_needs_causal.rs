use mixc_macro::mixer;

fn main() {
    let _spec = mixer! {
        mixer bad {
            heads = 8;
            head_dim = 64;
            decay = 0.9;
            mask = window(128);
            norm = none;
        }
    };
}
