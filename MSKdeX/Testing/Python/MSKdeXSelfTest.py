"""Runs the module's self-test (MSKdeXTest) as a ctest inside Slicer."""

import unittest

import slicer


class MSKdeXSelfTest(unittest.TestCase):
    def test_self_test(self):
        from MSKdeX import MSKdeXTest

        test = MSKdeXTest()
        test.runTest()
        slicer.mrmlScene.Clear()


if __name__ == "__main__":
    unittest.main()
