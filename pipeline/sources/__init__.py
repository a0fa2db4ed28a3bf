"""Dataset sources, each listing its split (:class:`.base.SourceListing` of :class:`.base.SourceItem`) for the converter:
:mod:`.ilsvrc` and :mod:`.cub` (their real on-disk layouts), :mod:`.synthetic` (a generated set in
the CUB layout), and :mod:`.ilsvrc_fixture` (test trees in the ILSVRC layout from real geometry)."""
