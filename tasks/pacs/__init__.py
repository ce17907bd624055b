"""medxfer's PACS client: search, retrieve and results over DICOMweb or DIMSE (see tasks/pacs/source.py)."""
