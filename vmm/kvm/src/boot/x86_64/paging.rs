//! Identity page tables for the first 4 GiB with 2 MiB pages (Intel SDM
//! Vol. 3A 4.5, Table 4-15/4-17): one PML4 entry -> one PDPT with four
//! entries -> four page directories of 512 large pages each.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{PDPT_ADDR, PD_ADDR, PD_COUNT, PML4_ADDR};
use crate::boot::BootError;

/// Page-table entry bit: present.
pub const PTE_PRESENT: u64 = 1 << 0;
/// Page-table entry bit: writable.
pub const PTE_WRITABLE: u64 = 1 << 1;
/// Page-directory entry bit: maps a 2 MiB page.
pub const PDE_PAGE_SIZE: u64 = 1 << 7;

/// Size of one large page (2 MiB).
pub const LARGE_PAGE: u64 = 2 << 20;

/// Bytes identity-mapped by [`write_identity_page_tables`] (4 GiB).
pub const IDENTITY_MAPPED: u64 = PD_COUNT * 512 * LARGE_PAGE;

/// Write PML4 at [`PML4_ADDR`], PDPT at [`PDPT_ADDR`] and page directories at
/// [`PD_ADDR`]..: guest virtual address X maps to physical X for X < 4 GiB.
///
/// Errors: [`BootError::GuestWrite`] when the table pages are not RAM.
pub fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let err = |addr| BootError::GuestWrite { what: "page tables", addr };
    mem.write_obj((PDPT_ADDR | PTE_PRESENT | PTE_WRITABLE).to_le(), GuestAddress(PML4_ADDR))
        .map_err(|_| err(PML4_ADDR))?;
    for pd in 0..PD_COUNT {
        let pd_addr = PD_ADDR + pd * 0x1000;
        let pdpte_addr = PDPT_ADDR + pd * 8;
        mem.write_obj((pd_addr | PTE_PRESENT | PTE_WRITABLE).to_le(), GuestAddress(pdpte_addr))
            .map_err(|_| err(pdpte_addr))?;
        let mut table = [0u8; 4096];
        for (i, chunk) in table.chunks_exact_mut(8).enumerate() {
            let phys = (pd * 512 + i as u64) * LARGE_PAGE;
            let pde = phys | PTE_PRESENT | PTE_WRITABLE | PDE_PAGE_SIZE;
            chunk.copy_from_slice(&pde.to_le_bytes());
        }
        mem.write_slice(&table, GuestAddress(pd_addr)).map_err(|_| err(pd_addr))?;
    }
    Ok(())
}
