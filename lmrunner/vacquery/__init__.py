"""VacQuery 01.03 (vac.md §8): the UDP protocol through which the factories of a space see each
other, wire-compatible with Vac 03.01 in both directions. ``protocol`` (messages), ``replies``
(what this factory answers), ``responder`` (the thread answering), ``client`` (asking the space).
"""
