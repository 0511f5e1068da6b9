"""Files: reading and writing images, volumes, sequences and DICOM (:mod:`.imageio`), safe
output paths, atomic writes and one-line error messages (:mod:`.safeio`), and the file
formats both know by name (:mod:`.formats`)."""
