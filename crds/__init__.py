"""The CustomResourceDefinitions as package data (``lorafleet.crds``): `lorafleet up` reads them from the
installed package, so it works from a wheel or the container image as from a checkout. The same folder
serves `kubectl apply -k crds`."""
