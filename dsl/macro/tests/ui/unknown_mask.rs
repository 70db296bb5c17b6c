use mixc_macro::mixer;

fn main() {
    let _spec = mixer! {
        mixer bad {
            heads = 8;
            head_dim = 64;
            mask = causl && window(4096);
        }
    };
}
