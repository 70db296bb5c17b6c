//! `mixer!{}`: the .mix grammar checked at compile time.
