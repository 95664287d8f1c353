from glinthawk.node.cli import main

main()
