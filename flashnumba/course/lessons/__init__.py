"""The lesson sources, NN_<name>.py in percent format (not modules: flashnumba.course.build reads them)."""
