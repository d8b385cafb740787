"""Training data: the built-in datasets and image folders (:mod:`debias.data.datasets`), what a dataset is in
memory (:mod:`debias.data.sets`), the prepared uint8 array a run trains from (:mod:`debias.data.prepared`), the
data order (:mod:`debias.data.order`) and the batches of a training step (:mod:`debias.data.batches`)."""
