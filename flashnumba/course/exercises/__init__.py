"""One module per exercise, ``eNN_<id>.py``, in course order (see flashnumba.course)."""
