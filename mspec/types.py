"""The batch layout shared by the input pipeline, the noise functions, the models and the losses.

Every batch has static shapes fixed by three per-device budgets:

* ``N`` = ``n_node``  : atom slots,
* ``E`` = ``n_edge``  : directed-edge slots,
* ``G`` = ``n_graph`` : molecule slots,
* ``T`` = ``max_torsions`` : torsion slots per molecule.

Molecules are packed greedily into one *device batch* until the next one would not fit. The last
node slot and the last graph slot are always padding (so every padding node has a padding graph to
belong to, as in jraph). Padding rows are zero-filled and masked out everywhere.

One device batch is a ``dict`` of arrays:

============================  ==================  ==================================================
key                           shape / dtype       meaning
============================  ==================  ==================================================
``atomic_numbers``            ``[N] int32``       Z of each atom; 0 for padding
``positions``                 ``[N, 3] float32``  clean (DFT) coordinates in Å; 0 for padding
``node_mask``                 ``[N] bool``        True for real atoms
``node_graph``                ``[N] int32``       molecule slot of each atom; padding atoms -> G - 1
``senders``                   ``[E] int32``       edge source j (messages flow j -> i)
``receivers``                 ``[E] int32``       edge target i
``edge_mask``                 ``[E] bool``        True for real edges (self-loops included)
``graph_mask``                ``[G] bool``        True for real molecules
``n_node``                    ``[G] int32``       atoms per molecule slot (0 for padding)
``torsion_atoms``             ``[G, T, 4] int32`` rotatable torsions (i, j, k, l) as batch node indices
``torsion_mask``              ``[G, T] bool``     True for real torsions
``node_moving``               ``[N, T] bool``     atom moves when torsion t *of its own molecule* is set
``pair_layout``               ``[] bool``         present (True) when the edges are in the pair layout
                                                  below; batches built by hand may leave it out
``spectrum_<name>``           ``[G, L] float32``  raw (unnormalised) spectrum of each molecule slot;
                                                  only for the types in ``Budget.spectra`` (e.g.
                                                  ``spectrum_uv [G, 701]``); 0 in padding slots
============================  ==================  ==================================================

Spectra ride in the same batch as the graphs, one row per molecule slot, so structure and
spectrum of a molecule pair up by slot index; ``graph_mask`` excludes padding slots from every
spectrum loss, the contrastive negatives and SpecFormer's BatchNorm statistics. Which types are
present is declared in the config (``config.spectra.types``), never inferred from the batch.

Edges are every ordered pair (j -> i) of atoms of one molecule closer than
``cutoff + skin`` (self-loops included), in the pair layout of :func:`mspec.graph.pack`: with
``P = mspec.graph.num_pairs(E, N)``, slots ``[0, P)`` hold each atom pair once, slots ``[P, 2P)``
the same pairs reversed, and the last ``N`` slots the self-loop of every node slot, so the model
computes each distance filter once per pair (``pair_layout`` marks such batches). The pipeline adds the
skin so that the graph stays valid after on-device noise moves the atoms; the model masks edges
longer than the cutoff itself, and :func:`mspec.graph.active_edges` applies the 32-neighbour cap on
the noisy positions.

For data parallelism over ``D`` devices, the global batch stacks ``D`` device batches on a leading
axis (``[D, N]``, ``[D, E]``, ...), sharded as ``P("data")``; the train step ``vmap``s the model over
it, so node indices stay device-local.
"""
