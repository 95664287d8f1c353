from glinthawk.cli import main

main()
