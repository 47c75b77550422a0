"""Package data, shipped in the wheel as `hparray.configs`: the default sweep configs that
`hparray init` copies into a project (this folder is also the checkout's own demo project)."""
