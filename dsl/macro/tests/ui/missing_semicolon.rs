use mixc_macro::mixer;

fn main() {
    let _spec = mixer! {
        mixer bad {
            heads = 8
            head_dim = 64;
        }
    };
}
