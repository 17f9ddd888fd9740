from oodens.cli import main

main()
