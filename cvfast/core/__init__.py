"""The bottom layer: cvfast's exception types and the argument checks every layer above shares."""
