"""nstjax: neural style transfer (Gatys, Ecker & Bethge 2015) in JAX."""
