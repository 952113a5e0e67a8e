"""Editing a trained run's knowledge: ``memlm learn`` adds documents, ``memlm forget`` removes them.

A fact lives in the blocks of its documents' path, apart from the anchor; so knowledge can be
added or removed by training only those blocks, with the anchor and every other block frozen:

- :mod:`memlm.edit.documents`: a run's training documents across its data and its edits (one
  numbering, their texts and sources, the forgotten set) and the edits log ``RUN/edits/log.jsonl``;
- :mod:`memlm.edit.repack`: the training data of an edit: leaves re-packed by prepare's packer
  without some documents, and new sequences copied per leaf;
- :mod:`memlm.edit.blocks`: frozen-anchor training of the blocks an edit touches, from the run's
  newest checkpoint, saved as a new bank version and checkpoint;
- :mod:`memlm.edit.learn`, :mod:`memlm.edit.forget`: the two verbs.
"""
